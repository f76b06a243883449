package dbcontrollers

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/comfyfarm/comfyfarm/schema"
)

// controllerFunc builds a controller over its frontend's Base.
type controllerFunc func(b *Base, fc FrontendConfig) (Controller, error)

// controllers maps a configured controller name to its constructor.
var controllers = map[string]controllerFunc{
	"generic": newGeneric,
	"style":   newStyle,
	"logo":    newLogo,
}

// ControllerNames lists the controller names a frontend may configure.
func ControllerNames() []string {
	names := make([]string, 0, len(controllers))
	for n := range controllers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// NewController builds the configured controller of one frontend over its
// open database.
func NewController(db *DB, fc FrontendConfig) (Controller, error) {
	build, ok := controllers[fc.controllerName()]
	if !ok {
		return nil, fmt.Errorf("frontend %s: unknown controller %q (known: %v)", fc.Name, fc.Controller, ControllerNames())
	}
	b, err := NewBase(db, fc)
	if err != nil {
		return nil, err
	}
	return build(b, fc)
}

// Registry maps frontend names to their controllers. The name is only ever a
// map key here: SQL never sees it.
type Registry struct {
	byName map[string]Controller
	dbs    []*DB
}

// NewRegistry opens (creating and migrating) every frontend's database and
// builds its controller.
func NewRegistry(ctx context.Context, cfg Config, frontends []FrontendConfig) (_ *Registry, err error) {
	r := &Registry{byName: make(map[string]Controller, len(frontends))}
	defer func() {
		if err != nil {
			_ = r.Close()
		}
	}()
	control, err := cfg.ControlDatabase()
	if err != nil {
		return nil, err
	}
	usedDB := map[string]string{}
	for _, fc := range frontends {
		if !schema.ValidFrontendName(fc.Name) {
			return nil, fmt.Errorf("frontend %q: name must match ^[a-z][a-z0-9_]{0,31}$", fc.Name)
		}
		if _, dup := r.byName[fc.Name]; dup {
			return nil, fmt.Errorf("frontend %s: configured twice", fc.Name)
		}
		if _, ok := controllers[fc.controllerName()]; !ok {
			return nil, fmt.Errorf("frontend %s: unknown controller %q (known: %v)", fc.Name, fc.Controller, ControllerNames())
		}
		dbName, err := cfg.FrontendDatabase(fc.Name, fc.Database)
		if err != nil {
			return nil, err
		}
		if dbName == control {
			return nil, fmt.Errorf("frontend %s: database %q is the control database", fc.Name, dbName)
		}
		if other, dup := usedDB[dbName]; dup {
			return nil, fmt.Errorf("frontend %s: database %q is already frontend %s's", fc.Name, dbName, other)
		}
		usedDB[dbName] = fc.Name
		db, err := OpenFrontend(ctx, cfg, dbName)
		if err != nil {
			return nil, fmt.Errorf("frontend %s: %w", fc.Name, err)
		}
		r.dbs = append(r.dbs, db)
		c, err := NewController(db, fc)
		if err != nil {
			return nil, err
		}
		r.byName[fc.Name] = c
	}
	return r, nil
}

// Get returns a frontend's controller; schema.ErrUnknownFrontend when none.
func (r *Registry) Get(name string) (Controller, error) {
	if c, ok := r.byName[name]; ok {
		return c, nil
	}
	return nil, schema.ErrUnknownFrontend
}

// Names lists the frontends, sorted.
func (r *Registry) Names() []string {
	names := make([]string, 0, len(r.byName))
	for n := range r.byName {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Ping checks every frontend database.
func (r *Registry) Ping(ctx context.Context) error {
	var errs []error
	for _, db := range r.dbs {
		errs = append(errs, db.Ping(ctx))
	}
	return errors.Join(errs...)
}

// Close closes every frontend database.
func (r *Registry) Close() error {
	var errs []error
	for _, db := range r.dbs {
		errs = append(errs, db.Close())
	}
	r.dbs = nil
	return errors.Join(errs...)
}
