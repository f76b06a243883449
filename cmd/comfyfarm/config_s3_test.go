package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const s3Base = "storage: {kind: s3, s3: {endpoint: \"https://s3.example.com\", bucket: b, access_key_id: a, secret_access_key: s"

func TestConfigS3(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("s3-secret-from-a-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _, err := LoadConfig(writeConfig(t, "storage: {kind: s3, s3: {bucket: from-file}}\n"), []string{
		"COMFYFARM_STORAGE_S3_ENDPOINT=http://127.0.0.1:9000",
		"COMFYFARM_STORAGE_S3_ACCESS_KEY_ID=ak",
		"COMFYFARM_STORAGE_S3_SECRET_ACCESS_KEY_FILE=" + secret,
		"COMFYFARM_STORAGE_S3_PATH_STYLE=true",
	})
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Storage.S3
	if s.Bucket != "from-file" || s.Endpoint != "http://127.0.0.1:9000" || s.SecretAccessKey != "s3-secret-from-a-file" ||
		!s.PathStyle || s.Region != "us-east-1" || !s.SignURLs || s.URLTTL != time.Hour {
		t.Fatalf("s3 config %+v", s)
	}
}

func TestConfigS3Refused(t *testing.T) {
	for name, c := range map[string]struct {
		file string
		want []string
	}{
		"no bucket":       {"storage: {kind: s3, s3: {endpoint: \"https://s3.example.com\", access_key_id: a, secret_access_key: s}}\n", []string{"storage.s3.bucket: required with storage.kind s3"}},
		"no endpoint":     {"storage: {kind: s3, s3: {bucket: b, access_key_id: a, secret_access_key: s}}\n", []string{"storage.s3.endpoint: required with storage.kind s3"}},
		"no credentials":  {"storage: {kind: s3, s3: {endpoint: \"https://s3.example.com\", bucket: b}}\n", []string{"storage.s3.access_key_id: required", "storage.s3.secret_access_key: required"}},
		"host only":       {strings.Replace(s3Base, "https://s3.example.com", "s3.example.com", 1) + "}}\n", []string{"storage.s3.endpoint", "http(s) URL"}},
		"ftp":             {strings.Replace(s3Base, "https://", "ftp://", 1) + "}}\n", []string{"storage.s3.endpoint", "http(s) URL"}},
		"no url at all":   {s3Base + ", sign_urls: false}}\n", []string{"storage.s3.public_base_url", "required when sign_urls is false"}},
		"zero ttl":        {s3Base + ", url_ttl: 0s}}\n", []string{"storage.s3.url_ttl", "positive"}},
		"ttl over 7 days": {s3Base + ", url_ttl: 169h}}\n", []string{"storage.s3.url_ttl", "168h"}},
		"unknown kind":    {"storage: {kind: gcs}\n", []string{"storage.kind", "local, oss or s3"}},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := LoadConfig(writeConfig(t, c.file), nil)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q lacks %q", err, w)
				}
			}
		})
	}
	if _, _, err := LoadConfig(writeConfig(t, s3Base+", sign_urls: false, public_base_url: \"https://cdn.example.com\"}}\n"), nil); err != nil {
		t.Fatalf("public URLs: %v", err)
	}
}
