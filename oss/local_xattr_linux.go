package oss

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// metaXattr is the extended attribute that holds an object's localMeta on
// file systems that support user attributes (ext4, xfs, btrfs, tmpfs since
// Linux 6.6). It travels with the file through the rename and is made
// durable by the file's own fsync, so it costs no file of its own.
const metaXattr = "user.comfyfarm.meta"

// setMetaAttr writes b as f's metadata attribute. errNoXattr: the file
// system has none (the caller writes a sidecar instead).
func setMetaAttr(f *os.File, b []byte) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fsetxattr(int(fd), metaXattr, b, 0) }); err != nil {
		return err
	}
	if errors.Is(serr, unix.ENOTSUP) || errors.Is(serr, unix.EOPNOTSUPP) || errors.Is(serr, unix.EPERM) {
		return errNoXattr
	}
	return serr
}

// metaAttr reads f's metadata attribute; nil when it has none.
func metaAttr(f *os.File) []byte {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	var out []byte
	_ = rc.Control(func(fd uintptr) {
		buf := make([]byte, 512)
		n, err := unix.Fgetxattr(int(fd), metaXattr, buf)
		if err == nil && n > 0 && n <= len(buf) {
			out = buf[:n]
		}
	})
	return out
}
