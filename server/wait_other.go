//go:build !unix

package server

import "net"

// connClosed cannot tell on this platform: a waiting request runs until its
// wait ends.
func connClosed(net.Conn) bool { return false }
