//go:build race

package server

// raceEnabled: the race detector slows every stream many times over; the
// flood test scales down under it (the full size runs without it, in CI too).
const raceEnabled = true
