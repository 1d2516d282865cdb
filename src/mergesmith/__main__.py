from mergesmith.cli import main

main()
