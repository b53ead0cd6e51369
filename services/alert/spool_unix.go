//go:build unix

package alert

import (
	"os"
	"syscall"
)

// mapFile maps the first n bytes of f for reading (the spool, read in key order:
// a read call per group cost more than the rest of the segment's writing); unmap
// releases them. Mapped here rather than with golang.org/x/exp/mmap, which maps
// by path: the spool is unlinked.
func mapFile(f *os.File, n int64) (data []byte, unmap func() error, err error) {
	if n == 0 {
		return nil, func() error { return nil }, nil
	}
	data, err = syscall.Mmap(int(f.Fd()), 0, int(n), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, nil, err
	}
	return data, func() error { return syscall.Munmap(data) }, nil
}
