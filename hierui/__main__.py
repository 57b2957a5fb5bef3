from hierui.cli import main

main()
