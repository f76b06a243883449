package server

import (
	"context"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// ModelLister is implemented by a NodeService that knows the nodes'
// catalogues: for every enum input (ckpt_name, lora_name, image...), each
// value and the nodes offering it, sorted.
type ModelLister interface {
	Models(ctx context.Context) (map[string]map[string][]string, error)
}

// modelList is GET /models (admin): {"ckpt_name": {"sd_xl_base_1.0.safetensors": ["gpu-1","gpu-2"]}, ...}.
func (s *Server) modelList(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	ml, ok := nodes.(ModelLister)
	if !ok {
		return schema.ErrNotReady
	}
	m, err := ml.Models(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(m)
}
