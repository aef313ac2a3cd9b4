from dagcast.cli import main

main()
