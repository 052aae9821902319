"""`bpfrouter explain`'s packet description, quoted as one argument or given as words."""
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from bpfrouter.explain import PacketSpecError, parse_spec, spec_words

MAC = b"\x02\x00\x00\x00\x00\x02"


def test_one_quoted_argument_builds_the_same_frame_as_words():
    words = ["udp", "10.0.1.2:4000", ">", "10.0.2.2:53", "ttl", "5"]
    assert spec_words(["udp 10.0.1.2:4000 > 10.0.2.2:53 ttl 5"]) == words
    assert spec_words(["udp 10.0.1.2:4000 >", " 10.0.2.2:53\tttl ", "5"]) == words  # a mix, any whitespace
    assert spec_words(words) == words
    frame = Ether(parse_spec(spec_words(["udp 10.0.1.2:4000 > 10.0.2.2:53 ttl 5"]), MAC))
    assert (frame[IP].src, frame[IP].dst, frame[IP].ttl, frame[UDP].sport, frame[UDP].dport) == \
        ("10.0.1.2", "10.0.2.2", 5, 4000, 53)


def test_a_quoted_description_with_an_error_names_the_word_not_the_whole_argument():
    with pytest.raises(PacketSpecError, match=r"^unknown protocol 'sctp': expected one of"):
        parse_spec(spec_words(["sctp 10.0.1.2 > 10.0.2.2"]), MAC)
    with pytest.raises(PacketSpecError, match="no packet given"):
        parse_spec(spec_words(["  "]), MAC)
