module github.com/clustersnap/clustersnap

go 1.26.8

require (
	github.com/dustin/go-humanize v1.1.0 // indirect
	github.com/pojntfx/go-nbd v0.3.2 // indirect
	github.com/stretchr/testify v1.12.1 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
