//go:build race

package exstore

// raceEnabled says the race detector is on. The Table is single-threaded,
// so the longest randomized tests do a fraction of their work under it.
const raceEnabled = true
