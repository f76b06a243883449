package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// TemplateStore keeps the workflow templates (the control database).
type TemplateStore interface {
	// TemplateInsert stores t as its template's next version and fills in
	// Version and CreatedAt.
	TemplateInsert(ctx context.Context, t *schema.Template) error
	// TemplateGet returns one version (0: the latest); schema.ErrNotFound.
	TemplateGet(ctx context.Context, frontend, name string, version int) (*schema.Template, error)
	// TemplateList returns the latest version of each template, by name.
	TemplateList(ctx context.Context, frontend string) ([]schema.Template, error)
	// TemplateDelete deletes every version; schema.ErrNotFound.
	TemplateDelete(ctx context.Context, frontend, name string) error
}

func (s *Server) templateStore() (TemplateStore, error) {
	if s.deps.Templates == nil {
		return nil, schema.ErrNotReady
	}
	return s.deps.Templates, nil
}

// templateName reads the {name} path parameter.
func templateName(c *fiber.Ctx) (string, error) {
	name, err := param(c, "name")
	if err != nil {
		return "", err
	}
	if !schema.ValidTemplateName(name) {
		return "", schema.Invalid("name", "template names are lower-case letters, digits, _ and -, 1 to 64 bytes")
	}
	return name, nil
}

// templatePut stores a new version of a template: 201 for the first version,
// 200 for a later one; the answer is the stored template.
func (s *Server) templatePut(c *fiber.Ctx) error {
	store, err := s.templateStore()
	if err != nil {
		return err
	}
	name, err := templateName(c)
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	var b templateBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	wf, err := checkTemplate(&b, s.cfg.MaxGraphNodes)
	if err != nil {
		return err
	}
	t := &schema.Template{Frontend: frontend, Name: name, Workflow: wf, Inputs: b.Inputs}
	if err := store.TemplateInsert(c.UserContext(), t); err != nil {
		return err
	}
	status := http.StatusOK
	if t.Version == 1 {
		status = http.StatusCreated
	}
	return c.Status(status).JSON(t)
}

// templateGet answers one template: the latest version, or ?version=N. A
// frontend key may read its own frontend's templates (to learn their
// inputs); the admin key names the frontend.
func (s *Server) templateGet(c *fiber.Ctx) error {
	store, err := s.templateStore()
	if err != nil {
		return err
	}
	name, err := templateName(c)
	if err != nil {
		return err
	}
	version, err := intQuery(c, "version", 0, 1, 1<<30)
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	t, err := store.TemplateGet(c.UserContext(), frontend, name, version)
	if err != nil {
		return err
	}
	return c.JSON(t)
}

// templateDelete deletes a template, every version of it. Jobs made from it
// keep their "name@version"; the numbers are not given again.
func (s *Server) templateDelete(c *fiber.Ctx) error {
	store, err := s.templateStore()
	if err != nil {
		return err
	}
	name, err := templateName(c)
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	if err := store.TemplateDelete(c.UserContext(), frontend, name); err != nil {
		return err
	}
	return c.SendStatus(http.StatusNoContent)
}

// templateList lists a frontend's templates, the latest version of each,
// without their workflows.
func (s *Server) templateList(c *fiber.Ctx) error {
	store, err := s.templateStore()
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	list, err := store.TemplateList(c.UserContext(), frontend)
	if err != nil {
		return err
	}
	for i := range list {
		list[i].Workflow = nil
	}
	return c.JSON(list)
}

// expandTemplate turns a template submission into the workflow to run and
// the job's "name@version". uploads are the names of the uploaded files.
func (s *Server) expandTemplate(ctx context.Context, frontend, ref string, inputs json.RawMessage, uploads map[string]bool) (json.RawMessage, string, error) {
	store, err := s.templateStore()
	if err != nil {
		return nil, "", err
	}
	name, version, err := schema.ParseTemplateRef(ref)
	if err != nil {
		return nil, "", err
	}
	given, err := decodeInputs(inputs)
	if err != nil {
		return nil, "", err
	}
	t, err := store.TemplateGet(ctx, frontend, name, version)
	if err != nil {
		if errors.Is(err, schema.ErrNotFound) {
			return nil, "", newAPIError(http.StatusNotFound, "template_not_found", "no such template").
				with("template", ref).with("frontend", frontend)
		}
		return nil, "", err
	}
	wf, err := resolveInputs(t, given, uploads)
	if err != nil {
		return nil, "", err
	}
	return wf, t.Ref(), nil
}

// decodeInputs reads a submission's "inputs": a JSON object (or nothing).
func decodeInputs(raw json.RawMessage) (map[string]json.RawMessage, error) {
	if !hasValue(raw) {
		return nil, nil
	}
	if !jsonObject(raw) {
		return nil, schema.Invalid("inputs", "must be a JSON object of input values")
	}
	var given map[string]json.RawMessage
	if err := json.Unmarshal(raw, &given); err != nil {
		return nil, schema.Invalid("inputs", "must be a JSON object of input values")
	}
	return given, nil
}
