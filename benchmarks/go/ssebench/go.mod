module edge/benchmarks/ssebench

go 1.19
