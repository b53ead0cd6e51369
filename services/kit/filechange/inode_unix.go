//go:build unix

package filechange

import (
	"io/fs"
	"syscall"
)

// inode is info's inode number.
func inode(info fs.FileInfo) uint64 {
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Ino) // not uint64 on every system
	}
	return 0
}
