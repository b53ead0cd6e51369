module github.com/sluicehq/sluice/services/dedup

go 1.26.8
