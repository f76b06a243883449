//go:build unix

package server

import (
	"errors"
	"net"
	"syscall"
)

// connClosed peeks one byte of the connection's socket (MSG_PEEK: nothing is
// consumed, so a pipelined next request stays for the server to read). A
// read of 0 bytes is the peer's FIN; ECONNRESET and the like mean it is gone
// too; EAGAIN (nothing to read) or data mean it is still there.
func connClosed(conn net.Conn) bool {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	_ = raw.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == nil:
			closed = n == 0
		case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EWOULDBLOCK), errors.Is(err, syscall.EINTR):
		default:
			closed = true
		}
	})
	return closed
}
