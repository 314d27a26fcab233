from zdist.broker.cli import main

main()
