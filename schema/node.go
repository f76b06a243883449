package schema

import "time"

// NodeState is the health of a node as seen by the prober.
type NodeState string

const (
	NodeUp NodeState = "up"
	// NodeDegraded: answers, but slow or erroring, or failed
	// scheduler.node_failure_limit jobs in a row for reasons of its own
	// (NodeView.Reason says which); it gets no new jobs until it recovers.
	NodeDegraded NodeState = "degraded"
	NodeDown     NodeState = "down"
	NodeDraining NodeState = "draining" // finishes current work, takes no new work
	NodeUnknown  NodeState = "unknown"  // not probed yet
)

// Node is one registered ComfyUI server.
type Node struct {
	Name        string    `json:"name"`
	URL         string    `json:"url"`
	Tags        []string  `json:"tags"`
	MaxInflight int       `json:"max_inflight"`
	Drain       bool      `json:"drain"`
	Source      string    `json:"source"` // "config" or "api"
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// Device is one GPU (or CPU) of a node, from /system_stats.
type Device struct {
	Name      string `json:"name"`
	Type      string `json:"type,omitempty"`
	VRAMTotal int64  `json:"vram_total"`
	VRAMFree  int64  `json:"vram_free"`
}

// ProbeResult is what one probe of a host and port found.
type ProbeResult struct {
	URL            string    `json:"url"`
	Host           string    `json:"host"`
	Port           int       `json:"port"`
	HostReachable  bool      `json:"host_reachable"`
	PortOpen       bool      `json:"port_open"`
	ComfyOK        bool      `json:"comfy_ok"`
	LatencyMS      float64   `json:"latency_ms"`
	Error          string    `json:"error,omitempty"`
	ComfyUIVersion string    `json:"comfyui_version,omitempty"`
	Devices        []Device  `json:"devices"`
	QueueRunning   int       `json:"queue_running"`
	QueuePending   int       `json:"queue_pending"`
	ProbedAt       time.Time `json:"probed_at"`
}

// NodeView is the operator's view of a node (contract, DESIGN §4).
type NodeView struct {
	Name           string     `json:"name"`
	URL            string     `json:"url"`
	Host           string     `json:"host"`
	Port           int        `json:"port"`
	Tags           []string   `json:"tags"`
	MaxInflight    int        `json:"max_inflight"`
	State          NodeState  `json:"state"`
	Reason         string     `json:"reason"` // why the node is not up (degraded, down, draining); empty when up
	HostReachable  bool       `json:"host_reachable"`
	PortOpen       bool       `json:"port_open"`
	ComfyOK        bool       `json:"comfy_ok"`
	LatencyMS      float64    `json:"latency_ms"`
	LastProbeAt    *time.Time `json:"last_probe_at"`
	LastOKAt       *time.Time `json:"last_ok_at"`
	Error          string     `json:"error"`
	ComfyUIVersion string     `json:"comfyui_version"`
	Devices        []Device   `json:"devices"`
	QueueRunning   int        `json:"queue_running"`
	QueuePending   int        `json:"queue_pending"`
	Inflight       int        `json:"inflight"`
	CurrentJob     string     `json:"current_job"`
	ModelsLoaded   []string   `json:"models_loaded"`
	// Catalogue counts, from the node's /object_info (0 until it is read):
	// checkpoint and LoRA files, and custom node packs (distinct python
	// modules of classes outside ComfyUI's own nodes).
	Checkpoints     int        `json:"checkpoints"`
	Loras           int        `json:"loras"`
	CustomNodePacks int        `json:"custom_node_packs"`
	CatalogueAt     *time.Time `json:"catalogue_at"` // when the catalogue was last read
	JobsDone        int64      `json:"jobs_done"`
	JobsFailed      int64      `json:"jobs_failed"`
}
