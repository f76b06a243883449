package dbcontrollers

import (
	"fmt"

	"github.com/comfyfarm/comfyfarm/schema"
)

// LogoInitialCredits is the logo app's starting grant when its configuration
// sets none: a logo takes several tries, so new users get more.
const LogoInitialCredits = 10

// Logo is the controller of a logo app: it keeps PNG output only (logos
// need lossless pixels and transparency) and grants LogoInitialCredits to new
// users unless initial credits are configured.
type Logo struct{ *Base }

var _ Controller = Logo{}

func newLogo(b *Base, fc FrontendConfig) (Controller, error) {
	if err := checkOptions(fc); err != nil {
		return nil, err
	}
	if fc.InitialCredits == 0 {
		b.initialCredits = LogoInitialCredits
	}
	return Logo{b}, nil
}

// AcceptOutput accepts image/png only.
func (l Logo) AcceptOutput(contentType string) error {
	mt, err := mediaType(contentType)
	if err != nil {
		return err
	}
	if mt != "image/png" {
		return fmt.Errorf("%w: frontend %s keeps image/png only, not %s", schema.ErrUnsupportedMedia, l.name, mt)
	}
	return nil
}
