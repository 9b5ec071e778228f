from candlekeep.cli import main

main()
