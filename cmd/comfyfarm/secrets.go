package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Files in data_dir.
const (
	adminKeyFile = "admin_key"
	secretFile   = "secret"
)

// secrets are the keys serve needs beyond the config file.
type secrets struct {
	adminKey string
	// master signs everything; each use gets its own derived key.
	master []byte
}

// derive returns a key for one purpose, so that a token of one kind can never
// pass for another.
func (s *secrets) derive(purpose string) []byte {
	m := hmac.New(sha256.New, s.master)
	m.Write([]byte("comfyfarm/" + purpose))
	return m.Sum(nil)
}

// loadSecrets reads (or on first start makes) the signing secret and, when
// the config has no admin key, the admin key in dataDir. A new admin key is
// printed once to w.
func loadSecrets(dataDir, configuredAdminKey string, w io.Writer) (*secrets, error) {
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data_dir: %w", err)
	}
	raw, _, err := readOrCreate(filepath.Join(dataDir, secretFile), func() (string, error) {
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return "", err
		}
		return hex.EncodeToString(b), nil
	})
	if err != nil {
		return nil, fmt.Errorf("signing secret: %w", err)
	}
	master, err := hex.DecodeString(raw)
	if err != nil || len(master) < 16 {
		return nil, fmt.Errorf("signing secret %s: not hex of at least 16 bytes", filepath.Join(dataDir, secretFile))
	}
	s := &secrets{adminKey: configuredAdminKey, master: master}
	if s.adminKey != "" {
		return s, nil
	}
	path := filepath.Join(dataDir, adminKeyFile)
	key, created, err := readOrCreate(path, func() (string, error) {
		b := make([]byte, 24)
		if _, err := rand.Read(b); err != nil {
			return "", err
		}
		return "cf-admin-" + base64.RawURLEncoding.EncodeToString(b), nil
	})
	if err != nil {
		return nil, fmt.Errorf("admin key: %w", err)
	}
	if len(key) < 16 {
		return nil, fmt.Errorf("admin key in %s: shorter than 16 characters", path)
	}
	if created {
		fmt.Fprintf(w, "comfyfarm: generated the admin key (shown once; kept in %s):\n\n    %s\n\n", path, key)
	}
	s.adminKey = key
	return s, nil
}

// readOrCreate returns the trimmed content of path, or creates the file
// (mode 0600, exclusively, so two starting processes agree) with make's value.
func readOrCreate(path string, make func() (string, error)) (string, bool, error) {
	if b, err := os.ReadFile(path); err == nil {
		return strings.TrimSpace(string(b)), false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", false, err
	}
	v, err := make()
	if err != nil {
		return "", false, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		b, err := os.ReadFile(path)
		return strings.TrimSpace(string(b)), false, err
	} else if err != nil {
		return "", false, err
	}
	if _, err := f.WriteString(v + "\n"); err != nil {
		f.Close()
		return "", false, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return "", false, err
	}
	return v, true, f.Close()
}
