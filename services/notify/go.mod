module github.com/sluicehq/sluice/services/notify

go 1.26.8
