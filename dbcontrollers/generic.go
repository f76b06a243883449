package dbcontrollers

import "fmt"

// Generic is the controller of a frontend without code of its own: Base as
// it is.
type Generic struct{ *Base }

var _ Controller = Generic{}

func newGeneric(b *Base, fc FrontendConfig) (Controller, error) {
	if err := checkOptions(fc, "accept"); err != nil {
		return nil, err
	}
	return Generic{b}, nil
}

// checkOptions refuses options a controller does not know, naming them.
func checkOptions(fc FrontendConfig, known ...string) error {
	for k := range fc.Options {
		ok := false
		for _, kn := range known {
			ok = ok || k == kn
		}
		if !ok {
			return fmt.Errorf("frontend %s: controller %s has no option %q (known: %v)", fc.Name, fc.controllerName(), k, known)
		}
	}
	return nil
}

func (fc FrontendConfig) controllerName() string {
	if fc.Controller == "" {
		return "generic"
	}
	return fc.Controller
}
