using System.Buffers;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>Copies bytes at a position of some stored tensor data into a destination span (exactly its length).</summary>
internal delegate void ByteReader(long position, Span<byte> destination);

/// <summary>
/// Builds a tensor from stored little-endian bytes, writing straight into the new tensor's storage (in chunks of at
/// most 1 GiB, since a span is limited to 2 GiB). Dtypes TorchSharp lacks go through a small conversion buffer.
/// </summary>
internal static class TensorFill
{
    /// <summary>Largest piece copied through one span (spans stop at 2 GiB). Settable so tests can exercise the chunking with small tensors.</summary>
    internal static long ChunkBytes = 1L << 30;
    const int ConvertChunkElements = 1 << 18;

    static TensorFill()
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("LoraSharp tensor files are little-endian; this machine is big-endian");
    }

    /// <summary>A new CPU tensor of <paramref name="shape"/> from the bytes of <paramref name="dtypeName"/> elements starting at position 0 of the reader.</summary>
    public static Tensor Read(string dtypeName, long[] shape, ByteReader read, string filePath, string key)
    {
        using var scope = NewDisposeScope();
        var native = SafetensorsDType.NativeType(dtypeName);
        var result = empty(shape, native ?? SafetensorsDType.LoadedType(dtypeName));
        long count = result.numel();
        if (count == 0)
            return result.MoveToOuterDisposeScope();
        using var flat = result.view(-1);
        if (native is not null)
        {
            long elementSize = SafetensorsDType.ElementSize(dtypeName);
            long chunkElements = Math.Max(1, ChunkBytes / elementSize);
            for (long start = 0; start < count; start += chunkElements)
            {
                long n = Math.Min(chunkElements, count - start);
                using var part = flat.narrow(0, start, n);
                read(start * elementSize, part.bytes);
            }
        }
        else
        {
            int srcSize = SafetensorsDType.ElementSize(dtypeName);
            var buffer = ArrayPool<byte>.Shared.Rent(ConvertChunkElements * srcSize);
            try
            {
                for (long start = 0; start < count; start += ConvertChunkElements)
                {
                    int n = (int)Math.Min(ConvertChunkElements, count - start);
                    var src = buffer.AsSpan(0, n * srcSize);
                    read(start * srcSize, src);
                    using var part = flat.narrow(0, start, n);
                    long bad = SafetensorsDType.ConvertChunk(dtypeName, src, part.bytes);
                    if (bad >= 0)
                        throw new LoraSharpException(
                            $"element {start + bad} of this {dtypeName} tensor is above {long.MaxValue}, the largest value int64 (the type U64 is read as) holds",
                            filePath, key);
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>Writes a CPU, contiguous tensor's bytes to a stream in pieces of at most <see cref="ChunkBytes"/>.</summary>
    public static void WriteTo(Stream stream, Tensor contiguousCpu)
    {
        long count = contiguousCpu.numel();
        if (count == 0) return;
        using var flat = contiguousCpu.view(-1);
        long chunk = Math.Max(1, ChunkBytes / contiguousCpu.element_size());
        for (long start = 0; start < count; start += chunk)
        {
            using var part = flat.narrow(0, start, Math.Min(chunk, count - start));
            stream.Write(part.bytes);
        }
    }

    /// <summary>Applies a requested dtype and device to a freshly read tensor (disposing the intermediate).</summary>
    public static Tensor Convert(Tensor t, ScalarType? dtype, Device? device)
    {
        if (dtype is { } d && t.dtype != d)
        {
            var c = t.to_type(d);
            t.Dispose();
            t = c;
        }
        if (device is not null && (t.device_type != device.type || (device.index >= 0 && t.device_index != device.index)))
        {
            var c = t.to(device);
            t.Dispose();
            t = c;
        }
        return t;
    }
}
