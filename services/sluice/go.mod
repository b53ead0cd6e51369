module github.com/sluicehq/sluice/services/sluice

go 1.26.8
