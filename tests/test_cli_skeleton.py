from amls_cli import build_parser


def test_parser_builds_and_requires_a_command():
    parser = build_parser()
    assert parser.prog == "amls"
