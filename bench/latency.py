"""A TCP relay that delays what the client sends by a fixed time: an S3 server on this machine then answers
as one across a network does (each request waits one more round trip). Used by bench/snapshots.

usage: latency.py LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
"""
import asyncio
import sys


async def pipe(reader, writer, delay):
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    port, host, tport, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) / 1000

    async def serve(cr, cw):
        sr, sw = await asyncio.open_connection(host, tport)
        await asyncio.gather(pipe(cr, sw, delay), pipe(sr, cw, 0))

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
