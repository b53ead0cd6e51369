module github.com/sluicehq/sluice/services/enrich

go 1.26.8
