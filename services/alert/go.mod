module github.com/sluicehq/sluice/services/alert

go 1.26.8
