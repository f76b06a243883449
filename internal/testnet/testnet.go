// Package testnet has network helpers shared by the project's tests.
package testnet

import (
	"net"
	"testing"
)

// RefusedAddr returns a loopback address ("127.0.0.1:port") that refuses
// connections until the test ends. A listener opened and closed again would
// free its port for the next listener (of this test binary or another one) to
// take; instead the port is held by the client end of an open connection: no
// one can listen on it, and a connection attempt is refused.
func RefusedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	t.Cleanup(func() {
		c.Close()
		if peer != nil {
			peer.Close()
		}
	})
	return c.LocalAddr().String()
}
