package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigWebhooks(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("whsec_c3R5bGUtd2ViaG9vay1zZWNyZXQtMDEyMw==\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, _, err := LoadConfig(writeConfig(t, "webhooks: {allow: [\"*.hooks.example.com\", 10.0.0.0/8], backoff: [1s, 1m]}\n"), []string{
		"COMFYFARM_FRONTENDS_STYLE_WEBHOOK_URL=https://style.example.com/hook",
		"COMFYFARM_FRONTENDS_STYLE_WEBHOOK_SECRET_FILE=" + secret,
		"COMFYFARM_FRONTENDS_STYLE_WEBHOOK_EVENTS=succeeded,failed",
		"COMFYFARM_WEBHOOKS_TIMEOUT=3s",
	})
	if err != nil {
		t.Fatal(err)
	}
	w := cfg.Frontends["style"].Webhook
	if w.URL != "https://style.example.com/hook" || w.Secret != "whsec_c3R5bGUtd2ViaG9vay1zZWNyZXQtMDEyMw==" ||
		strings.Join(w.Events, ",") != "succeeded,failed" {
		t.Fatalf("style webhook %+v", w)
	}
	h := cfg.Webhooks
	if len(h.Allow) != 2 || h.Concurrency != 8 || h.PerFrontend != 4 || h.Timeout != 3*time.Second || h.MaxAge != 24*time.Hour ||
		len(h.Backoff) != 2 || h.Backoff[1] != time.Minute || h.PollInterval != time.Second {
		t.Fatalf("webhooks %+v", h)
	}
	if logo := cfg.Frontends["logo"].Webhook; logo.Secret != "" || len(logo.Events) != 3 {
		t.Fatalf("logo webhook %+v", logo)
	}
}

func TestConfigWebhooksRefused(t *testing.T) {
	const style = "frontends: {style: {api_keys: [style-key-1], webhook: "
	for name, c := range map[string]struct {
		file string
		want string
	}{
		"url without secret": {style + "{url: \"https://x.example.com/\"}}}\n", "frontends.style.webhook.secret: required when webhook.url is set"},
		"short secret":       {style + "{secret: short}}}\n", "frontends.style.webhook.secret: secret shorter than 16 bytes"},
		"bad base64":         {style + "{secret: \"whsec_***\"}}}\n", "frontends.style.webhook.secret: a whsec_ secret must be base64"},
		"ftp url":            {style + "{url: \"ftp://x/\", secret: 0123456789abcdef0}}}\n", "frontends.style.webhook.url"},
		"unknown event":      {style + "{secret: 0123456789abcdef0, events: [running]}}}\n", "frontends.style.webhook.events[0]: want succeeded, failed or cancelled"},
		"allow entry":        {"webhooks: {allow: [\"http://x\"]}\n", "webhooks.allow"},
		"per frontend":       {"webhooks: {concurrency: 2, per_frontend: 3}\n", "webhooks.per_frontend: want 1 to webhooks.concurrency (2)"},
		"no backoff":         {"webhooks: {backoff: []}\n", "webhooks.backoff: at least one wait is needed"},
		"zero backoff":       {"webhooks: {backoff: [0s]}\n", "webhooks.backoff[0]: must be a positive duration"},
		"zero max age":       {"webhooks: {max_age: 0s}\n", "webhooks.max_age: must be a positive duration"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := LoadConfig(writeConfig(t, c.file), nil)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want %q", err, c.want)
			}
		})
	}
}
