//go:build !unix

package alert

import "os"

// mapFile reads the first n bytes of f (where files cannot be mapped).
func mapFile(f *os.File, n int64) (data []byte, unmap func() error, err error) {
	data = make([]byte, n)
	if _, err := f.ReadAt(data, 0); err != nil {
		return nil, nil, err
	}
	return data, func() error { return nil }, nil
}
