package webhook

import (
	"fmt"
	"net/netip"
	"net/url"
	"strings"

	"github.com/comfyfarm/comfyfarm/schema"
)

// MaxURLBytes bounds a webhook address (the column is that wide).
const MaxURLBytes = 2048

// AllowList says which hosts a job's own webhook_url may name
// (webhooks.allow): networks and addresses ("10.0.0.0/8", "127.0.0.1") for
// URLs whose host is an IP address, host names ("hooks.example.com") and
// wildcards ("*.example.com": any name under example.com, not example.com
// itself) for the rest. Names are matched as written in the URL, without
// resolving them: a name is trusted by whoever configured the list. Empty:
// no job may give its own address.
type AllowList struct {
	prefixes []netip.Prefix
	hosts    []string // exact, lower case
	suffixes []string // ".example.com" for "*.example.com"
}

// ParseAllowList reads webhooks.allow; an entry that is none of the forms
// above is an error naming it.
func ParseAllowList(entries []string) (AllowList, error) {
	var a AllowList
	for i, raw := range entries {
		s := strings.ToLower(strings.TrimSpace(raw))
		if p, err := netip.ParsePrefix(s); err == nil {
			a.prefixes = append(a.prefixes, p.Masked())
			continue
		}
		if ip, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
			ip = ip.Unmap().WithZone("")
			a.prefixes = append(a.prefixes, netip.PrefixFrom(ip, ip.BitLen()))
			continue
		}
		wild := strings.HasPrefix(s, "*.")
		name := strings.TrimSuffix(strings.TrimPrefix(s, "*."), ".")
		if !validHostName(name) {
			return AllowList{}, fmt.Errorf("entry %d %q: want a host name, *.domain, an IP address or a CIDR", i, raw)
		}
		if wild {
			a.suffixes = append(a.suffixes, "."+name)
		} else {
			a.hosts = append(a.hosts, name)
		}
	}
	return a, nil
}

// Empty reports whether the list allows nothing.
func (a AllowList) Empty() bool {
	return len(a.prefixes) == 0 && len(a.hosts) == 0 && len(a.suffixes) == 0
}

// validHostName: dot-separated labels of letters, digits and hyphens, not
// starting or ending with a hyphen.
func validHostName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// Check validates a job's webhook_url: http or https, a host the list allows,
// no fragment, at most MaxURLBytes. Refusals are *schema.ValidationError for
// field webhook_url.
func (a AllowList) Check(raw string) error {
	u, err := ParseURL(raw)
	if err != nil {
		return err
	}
	if a.Empty() {
		return schema.Invalid("webhook_url", "per-job webhook URLs are not allowed here (webhooks.allow is empty)")
	}
	host := strings.ToLower(strings.TrimSuffix(u.Hostname(), "."))
	if ip, err := netip.ParseAddr(host); err == nil {
		ip = ip.Unmap().WithZone("")
		for _, p := range a.prefixes {
			if p.Contains(ip) {
				return nil
			}
		}
		return schema.Invalid("webhook_url", "host %s is not in webhooks.allow", ip)
	}
	for _, h := range a.hosts {
		if host == h {
			return nil
		}
	}
	for _, s := range a.suffixes {
		if strings.HasSuffix(host, s) {
			return nil
		}
	}
	return schema.Invalid("webhook_url", "host %q is not in webhooks.allow", host)
}

// ParseURL checks the form of a webhook address (any host): absolute http or
// https, a host, no fragment, at most MaxURLBytes.
func ParseURL(raw string) (*url.URL, error) {
	if len(raw) > MaxURLBytes {
		return nil, schema.Invalid("webhook_url", "longer than %d bytes", MaxURLBytes)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, schema.Invalid("webhook_url", "not a URL")
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, schema.Invalid("webhook_url", "must be an http or https URL")
	case u.Opaque != "" || u.Hostname() == "":
		return nil, schema.Invalid("webhook_url", "must name a host")
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return nil, schema.Invalid("webhook_url", "must not have a fragment")
	}
	if p := u.Port(); p != "" {
		n := 0
		for _, c := range []byte(p) {
			n = n*10 + int(c-'0')
			if n > 65535 {
				break
			}
		}
		if n < 1 || n > 65535 {
			return nil, schema.Invalid("webhook_url", "port out of range")
		}
	}
	return u, nil
}
