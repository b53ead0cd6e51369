package events

import (
	"bytes"
	"iter"
	"unicode/utf8"

	gojson "github.com/goccy/go-json"
)

// objectMembers yields the members of the JSON object b (valid JSON, b[0] its
// opening brace): each name as written between its quotes (escapes not undone) and
// the raw value.
func objectMembers(b []byte) iter.Seq2[[]byte, []byte] {
	return func(yield func(name, value []byte) bool) {
		i := skipSpace(b, 1)
		for i < len(b) && b[i] == '"' {
			end := stringEnd(b, i)
			name := b[i+1 : end-1]
			i = skipSpace(b, end)
			i = skipSpace(b, i+1) // the colon
			vEnd := valueEnd(b, i)
			if !yield(name, b[i:vEnd:vEnd]) {
				return
			}
			i = skipSpace(b, vEnd)
			if i < len(b) && b[i] == ',' {
				i = skipSpace(b, i+1)
			}
		}
	}
}

// plainName reports whether a member name is as it reads: no escapes, valid UTF-8.
func plainName(name []byte) bool {
	for _, c := range name {
		if c == '\\' {
			return false
		}
		if c >= utf8.RuneSelf {
			return bytes.IndexByte(name, '\\') < 0 && utf8.Valid(name)
		}
	}
	return true
}

// stringEnd returns the index after the closing quote of the JSON string that
// starts at b[i]: the first quote not escaped (after an even number of
// backslashes), found a block at a time.
func stringEnd(b []byte, i int) int {
	for j := i + 1; j < len(b); {
		k := bytes.IndexByte(b[j:], '"')
		if k < 0 {
			break
		}
		q := j + k
		escaped := false
		for p := q - 1; p > i && b[p] == '\\'; p-- {
			escaped = !escaped
		}
		if !escaped {
			return q + 1
		}
		j = q + 1
	}
	return len(b)
}

// valueEnd returns the index after the JSON value (valid JSON) that starts at b[i].
func valueEnd(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = stringEnd(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return len(b)
	}
	for ; i < len(b); i++ { // a number, true, false, null
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
	}
	return len(b)
}

// skipSpace returns the index of the first byte at or after i that is not JSON
// whitespace.
func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// EditPath returns the JSON object b (valid JSON) with the member at path (names
// read with their escapes undone; every member of a repeated name) replaced by what
// edit makes of its value, or removed where edit says not to keep it. Only the
// objects along path are written again, their members' separators made compact;
// every other byte is kept, numbers of any size and precision too. ok is false
// where b has no member at path.
func EditPath(b []byte, path []string, edit func(value []byte) (replacement []byte, keep bool)) (out []byte, ok bool) {
	i := skipSpace(b, 0)
	if len(path) == 0 || i >= len(b) || b[i] != '{' {
		return nil, false
	}
	out = make([]byte, 0, len(b)+64)
	out = append(out, '{')
	wrote := false
	for rawName, value := range objectMembers(b[i:]) {
		if nameIs(rawName, path[0]) {
			var keep bool
			if len(path) > 1 {
				var edited []byte
				if edited, keep = EditPath(value, path[1:], edit); keep {
					value, ok = edited, true
				}
				keep = true // a member that does not hold the path stays as it is
			} else {
				value, keep = edit(value)
				ok = true
			}
			if !keep {
				continue
			}
		}
		if wrote {
			out = append(out, ',')
		}
		out = append(out, '"')
		out = append(out, rawName...)
		out = append(out, '"', ':')
		out = append(out, value...)
		wrote = true
	}
	if !ok {
		return nil, false
	}
	return append(out, '}'), true
}

// nameIs reports whether the member name written as raw (between its quotes,
// escapes not undone) is name.
func nameIs(raw []byte, name string) bool {
	if plainName(raw) {
		return string(raw) == name
	}
	var s string
	q := make([]byte, 0, len(raw)+2)
	q = append(append(append(q, '"'), raw...), '"')
	return gojson.Unmarshal(q, &s) == nil && s == name
}

// ValueAt returns the value of the member at path of the JSON object b (valid
// JSON; of a repeated name the last, as decoders take it).
func ValueAt(b []byte, path []string) (value []byte, ok bool) {
	if len(path) == 0 {
		return nil, false
	}
	for _, step := range path {
		i := skipSpace(b, 0)
		if i >= len(b) || b[i] != '{' {
			return nil, false
		}
		var found []byte
		ok = false
		for rawName, v := range objectMembers(b[i:]) {
			if nameIs(rawName, step) {
				found, ok = v, true
			}
		}
		if !ok {
			return nil, false
		}
		b = found
	}
	return b, true
}
