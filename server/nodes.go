package server

import (
	"net/http"
	"net/url"
	"regexp"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

var nodeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Node registration bounds.
const (
	maxNodeTags     = 32
	maxNodeInflight = 64
)

// nodeBody is POST /nodes.
type nodeBody struct {
	Name        string   `json:"name"`
	URL         string   `json:"url"`
	Tags        []string `json:"tags"`
	MaxInflight *int     `json:"max_inflight"`
}

func (b *nodeBody) node() (schema.Node, error) {
	if !nodeName.MatchString(b.Name) {
		return schema.Node{}, schema.Invalid("name", "must match %s", nodeName.String())
	}
	if err := checkNodeURL("url", b.URL); err != nil {
		return schema.Node{}, err
	}
	if err := checkNodeTags(b.Tags); err != nil {
		return schema.Node{}, err
	}
	n := schema.Node{Name: b.Name, URL: b.URL, Tags: b.Tags, MaxInflight: 1, Source: "api"}
	if n.Tags == nil {
		n.Tags = []string{}
	}
	if b.MaxInflight != nil {
		if err := checkMaxInflight(*b.MaxInflight); err != nil {
			return schema.Node{}, err
		}
		n.MaxInflight = *b.MaxInflight
	}
	return n, nil
}

// checkNodeTags bounds a node's tags: how many, and each a name.
func checkNodeTags(tags []string) error {
	if len(tags) > maxNodeTags {
		return schema.Invalid("tags", "more than %d tags", maxNodeTags)
	}
	for _, t := range tags {
		if !nodeName.MatchString(t) {
			return schema.Invalid("tags", "tag %q must match %s", t, nodeName.String())
		}
	}
	return nil
}

// checkMaxInflight bounds a node's max_inflight.
func checkMaxInflight(n int) error {
	if n < 1 || n > maxNodeInflight {
		return schema.Invalid("max_inflight", "must be between 1 and %d", maxNodeInflight)
	}
	return nil
}

// checkNodeURL accepts http(s)://host:port with nothing after the port but an
// optional "/".
func checkNodeURL(field, raw string) error {
	if raw == "" {
		return schema.Invalid(field, "required")
	}
	if len(raw) > 2048 {
		return schema.Invalid(field, "longer than 2048 bytes")
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" {
		return schema.Invalid(field, "must be an http or https URL with a host")
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/") {
		return schema.Invalid(field, "must be scheme://host:port only")
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return schema.Invalid(field, "port out of range")
		}
	}
	return nil
}

func (s *Server) nodeList(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	list, err := nodes.Nodes(c.UserContext())
	if err != nil {
		return err
	}
	if list == nil {
		list = []schema.NodeView{}
	}
	return c.JSON(list)
}

func (s *Server) nodeAdd(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	var b nodeBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	n, err := b.node()
	if err != nil {
		return err
	}
	v, err := nodes.NodeAdd(c.UserContext(), n)
	if err != nil {
		return err
	}
	return c.Status(http.StatusCreated).JSON(v)
}

func nodeParam(c *fiber.Ctx) (string, error) {
	name, err := param(c, "name")
	if err != nil {
		return "", err
	}
	if !nodeName.MatchString(name) {
		return "", schema.Invalid("name", "must match %s", nodeName.String())
	}
	return name, nil
}

// nodeRemove removes a node; its jobs are requeued.
func (s *Server) nodeRemove(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	name, err := nodeParam(c)
	if err != nil {
		return err
	}
	if err := nodes.NodeRemove(c.UserContext(), name); err != nil {
		return err
	}
	return c.SendStatus(http.StatusNoContent)
}

// drainBody is POST /nodes/{name}/drain.
type drainBody struct {
	Drain *bool `json:"drain"`
}

func (s *Server) nodeDrain(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	name, err := nodeParam(c)
	if err != nil {
		return err
	}
	var b drainBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if b.Drain == nil {
		return schema.Invalid("drain", "required: true or false")
	}
	v, err := nodes.NodeDrain(c.UserContext(), name, *b.Drain)
	if err != nil {
		return err
	}
	return c.JSON(v)
}

func (s *Server) nodeProbe(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	name, err := nodeParam(c)
	if err != nil {
		return err
	}
	v, err := nodes.NodeProbe(c.UserContext(), name)
	if err != nil {
		return err
	}
	return c.JSON(v)
}

// probeBody is POST /probe.
type probeBody struct {
	URL string `json:"url"`
}

// probe checks an unregistered host and port.
func (s *Server) probe(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	var b probeBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if err := checkNodeURL("url", b.URL); err != nil {
		return err
	}
	r, err := nodes.ProbeURL(c.UserContext(), b.URL)
	if err != nil {
		return err
	}
	return c.JSON(r)
}
