package main

import "testing"

// raw_workflows is true unless set, from a file or the environment; a
// frontend map from a file that leaves it out keeps it true.
func TestConfigRawWorkflows(t *testing.T) {
	cfg, _, err := LoadConfig("", []string{"COMFYFARM_FRONTENDS_LOGO_RAW_WORKFLOWS=false"})
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Frontends["style"].RawWorkflowsAllowed() || cfg.Frontends["logo"].RawWorkflowsAllowed() {
		t.Fatalf("defaults with logo off: %+v", cfg.Frontends)
	}
	p := writeConfig(t, "frontends:\n  shop: {api_keys: [shop-key-123]}\n  kiosk: {api_keys: [kiosk-key-123], raw_workflows: false}\n")
	if cfg, _, err = LoadConfig(p, nil); err != nil {
		t.Fatal(err)
	}
	if !cfg.Frontends["shop"].RawWorkflowsAllowed() || cfg.Frontends["kiosk"].RawWorkflowsAllowed() {
		t.Fatalf("file: %+v", cfg.Frontends)
	}
	if _, _, err := LoadConfig("", []string{"COMFYFARM_FRONTENDS_STYLE_RAW_WORKFLOWS=maybe"}); err == nil {
		t.Fatal("raw_workflows=maybe accepted")
	}
}

// events_url is absolute only for a public_url that was set, not for the one
// derived from listen.
func TestConfigExplicitPublicURL(t *testing.T) {
	cfg, _, err := LoadConfig("", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.PublicURL == "" || cfg.explicitPublicURL() != "" {
		t.Fatalf("derived %q, explicit %q", cfg.PublicURL, cfg.explicitPublicURL())
	}
	cfg, _, err = LoadConfig("", []string{"COMFYFARM_PUBLIC_URL=https://farm.example.com"})
	if err != nil || cfg.explicitPublicURL() != "https://farm.example.com" {
		t.Fatalf("set: %v %q", err, cfg.explicitPublicURL())
	}
}
