"""Magic packets byte by byte, sent for real to a UDP listener on 127.0.0.1."""

from __future__ import annotations

import re

import pytest
import trio

from edge_proxy.errors import WolError
from edge_proxy.wake.wol import UdpWolSender, magic_packet
from shared.config.edge import WolConfig
from tests.support.edge import TEST_TIMEOUT_S, PacketListener, expected_packet

MAC = bytes.fromhex("0011223344ff")


def test_packet_layout() -> None:
    packet = magic_packet(MAC)
    assert len(packet) == 102
    assert packet[:6] == b"\xff" * 6
    assert all(packet[6 + 6 * i: 12 + 6 * i] == MAC for i in range(16))
    assert packet == expected_packet("00:11:22:33:44:ff")
    secure = magic_packet(MAC, bytes.fromhex("010203040506"))
    assert len(secure) == 108 and secure.endswith(bytes.fromhex("010203040506"))
    with pytest.raises(ValueError, match="6 bytes"):
        magic_packet(b"\x00" * 5)


def test_packet_is_six_ff_then_sixteen_macs_then_the_password() -> None:
    # The bytes come from the wakeonlan library: pin them to the layout NICs expect.
    assert magic_packet(MAC) == bytes([0xFF] * 6) + MAC * 16
    password = bytes.fromhex("a1b2c3d4e5f6")
    assert magic_packet(MAC, password) == bytes([0xFF] * 6) + MAC * 16 + password
    with pytest.raises(ValueError, match="SecureOn password has 6 bytes"):
        magic_packet(MAC, b"\x01\x02")


async def test_udp_sender_delivers_the_packet_from_the_chosen_source() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener = await PacketListener.open()
            nursery.start_soon(listener.run)
            wol = WolConfig(broadcast="127.0.0.1", port=listener.port, source="127.0.0.1")
            await UdpWolSender().send(magic_packet(MAC), wol)
            await listener.wait_for(1)
            assert listener.packets[0][1] == magic_packet(MAC)
            nursery.cancel_scope.cancel()


async def test_a_source_address_that_is_not_ours_is_a_clear_error() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to this machine, so bind() fails before sending
    wol = WolConfig(broadcast="127.0.0.1", port=9, source="192.0.2.1")
    with pytest.raises(WolError, match=re.escape("cannot send magic packet to 127.0.0.1:9 from 192.0.2.1")):
        await UdpWolSender().send(magic_packet(MAC), wol)
