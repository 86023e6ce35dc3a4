package guest

import "strings"

// Results collects the "result KEY VALUE" lines a guest script printed, the
// convention the interop tests use to report what they measured. Values are
// trimmed of spaces and of surrounding double quotes.
func Results(output string) map[string]string {
	results := map[string]string{}
	for _, line := range strings.Split(output, "\n") {
		rest, ok := strings.CutPrefix(line, "result ")
		if !ok {
			continue
		}
		key, value, _ := strings.Cut(rest, " ")
		results[key] = strings.Trim(strings.TrimSpace(value), `"`)
	}
	return results
}
