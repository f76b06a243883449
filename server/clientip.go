package server

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// proxySet is the networks of the reverse proxies in front of the server
// (server.trusted_proxies). Only from them is X-Forwarded-For believed.
type proxySet []netip.Prefix

// parseProxies reads addresses ("10.0.0.5", "::1") and networks
// ("10.0.0.0/8").
func parseProxies(list []string) (proxySet, error) {
	var out proxySet
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("trusted proxy %q: want an address or a network such as 10.0.0.0/8", s)
		}
		out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	return out, nil
}

func (ps proxySet) trusts(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// clientIP is the address of the client that sent the request. A request from
// a trusted proxy names its client in X-Forwarded-For, each proxy appending
// the address it was reached from; the client is the rightmost address that
// is not itself a trusted proxy. Anything left of that was written by the
// client and proves nothing, so it is never taken (taking the leftmost entry
// would let any client choose its own address).
func (ps proxySet) clientIP(remote netip.Addr, forwardedFor []string) netip.Addr {
	remote = remote.Unmap()
	if len(ps) == 0 || !ps.trusts(remote) {
		return remote
	}
	client := remote
	for i := len(forwardedFor) - 1; i >= 0; i-- {
		parts := strings.Split(forwardedFor[i], ",")
		for j := len(parts) - 1; j >= 0; j-- {
			a, err := netip.ParseAddr(strings.TrimSpace(parts[j]))
			if err != nil {
				return client // a malformed hop: stop at the last one we could read
			}
			client = a.Unmap()
			if !ps.trusts(client) {
				return client
			}
		}
	}
	return client
}

// requestIP is clientIP for a request, as a string of its own (not fasthttp's
// buffer).
func (s *Server) requestIP(c *fiber.Ctx) string {
	remote, ok := netip.AddrFromSlice(c.Context().RemoteIP())
	if !ok {
		return ""
	}
	var xff []string
	if len(s.proxies) > 0 {
		for _, v := range c.Request().Header.PeekAll(fiber.HeaderXForwardedFor) {
			xff = append(xff, string(v))
		}
	}
	return s.proxies.clientIP(remote, xff).String()
}
