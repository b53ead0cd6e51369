module github.com/sluicehq/sluice/services/sink

go 1.26.8
