"""What the CLI prints is what it was given: IPv6 addresses contain
`:100:`, `:cd:` and other words rich would turn into emoji."""
from bpfrouter import cli, demo


def test_addresses_print_as_they_are():
    text = "tcp [fd00:100::3]:80 via fe80::cd:1 dev eth0 [link]"
    for console in (cli.console, demo.console):
        with console.capture() as cap:
            console.print(text, markup=False)
        assert cap.get().strip() == text
