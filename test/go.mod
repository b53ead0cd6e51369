module github.com/sluicehq/sluice/test

go 1.26.8
