//go:build !race

package exstore

// raceEnabled says the race detector is on (see table_race_test.go).
const raceEnabled = false
