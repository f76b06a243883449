//go:build !linux

package oss

import "os"

// setMetaAttr: extended attributes are used on Linux only; elsewhere the
// metadata goes to a sidecar file.
func setMetaAttr(*os.File, []byte) error { return errNoXattr }

func metaAttr(*os.File) []byte { return nil }
