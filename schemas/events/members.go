package events

import (
	"bytes"
	"iter"
	"unicode/utf8"
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
