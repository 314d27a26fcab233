from zdist.worker.cli import main

main()
