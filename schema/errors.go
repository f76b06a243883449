package schema

import (
	"errors"
	"fmt"
	"regexp"
)

// Sentinel errors shared by every layer; server maps them to statuses once.
var (
	ErrNotFound            = errors.New("not found")
	ErrConflict            = errors.New("conflict")
	ErrTerminal            = errors.New("job already finished")
	ErrUnknownFrontend     = errors.New("unknown frontend")
	ErrNoNode              = errors.New("no node can run this workflow")
	ErrInsufficientCredits = errors.New("not enough credits")
	ErrTooLarge            = errors.New("too large")
	ErrUnsupportedMedia    = errors.New("unsupported media type")
	ErrUnauthorized        = errors.New("missing or unknown api key")
	ErrForbidden           = errors.New("forbidden")
	ErrNotReady            = errors.New("not ready")
)

// InsufficientCreditsError is a credit change refused because the balance
// would go below 0. It matches ErrInsufficientCredits.
type InsufficientCreditsError struct {
	Balance int64 // before the change
	Change  int64 // the refused change (negative)
}

func (e *InsufficientCreditsError) Error() string {
	return fmt.Sprintf("%v: balance %d, change %d", ErrInsufficientCredits, e.Balance, e.Change)
}

// Is makes errors.Is(err, ErrInsufficientCredits) hold.
func (e *InsufficientCreditsError) Is(target error) bool { return target == ErrInsufficientCredits }

// ValidationError is bad input: a field and the reason it was refused.
type ValidationError struct {
	Field  string
	Reason string
}

func (e *ValidationError) Error() string {
	if e.Field == "" {
		return e.Reason
	}
	return e.Field + ": " + e.Reason
}

// Invalid builds a ValidationError.
func Invalid(field, format string, args ...any) error {
	return &ValidationError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

var frontendName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)

// ValidFrontendName reports whether name is a well-formed frontend name. Such a
// name is safe as an identifier (database name suffix, file name).
func ValidFrontendName(name string) bool { return frontendName.MatchString(name) }
