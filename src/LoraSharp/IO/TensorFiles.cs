namespace LoraSharp.IO;

/// <summary>Opens any supported tensor file, choosing the reader by the file's first bytes, not its extension.</summary>
public static class TensorFiles
{
    /// <summary>The format a file's first bytes announce.</summary>
    public enum Format { Safetensors, TorchZip, LegacyTorch, Unknown }

    /// <summary>
    /// Zip ("PK\x03\x04") → <see cref="PickleCheckpoint"/>; an 8-byte little-endian length followed by '{' →
    /// <see cref="SafetensorsFile"/>; a bare pickle or tar (torch &lt; 1.6 <c>torch.save</c>) → refused with a hint to re-save;
    /// anything else → <see cref="LoraSharpException"/>.
    /// </summary>
    public static ITensorSource Open(string path, TensorReadMode mode = TensorReadMode.MemoryMap)
    {
        var full = Path.GetFullPath(path);
        return Detect(full) switch
        {
            Format.Safetensors => SafetensorsFile.Open(full, mode),
            Format.TorchZip => PickleCheckpoint.Open(full, mode),
            Format.LegacyTorch => throw new LoraSharpException(
                "legacy (pre-zip) PyTorch format: re-save it with torch>=1.6 (torch.save(torch.load(f), f)) or convert it to safetensors", full),
            _ => throw new LoraSharpException("unknown file format: neither safetensors (8-byte header length + JSON) nor a PyTorch zip checkpoint", full),
        };
    }

    /// <summary>Reads the first bytes of a file and names its format.</summary>
    public static Format Detect(string path)
    {
        Span<byte> head = stackalloc byte[9];
        int n;
        try
        {
            using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete, 1);
            n = fs.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
            if (n >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K' && head[2] == 3 && head[3] == 4)
                return Format.TorchZip;
            if (n == 9 && head[8] == (byte)'{')
                return Format.Safetensors;
            if (n >= 2 && head[0] == 0x80 && head[1] is >= 2 and <= 5)
                return Format.LegacyTorch;
            if (fs.Length > 262)
            {
                Span<byte> tar = stackalloc byte[5];
                fs.Position = 257;
                if (fs.ReadAtLeast(tar, 5, false) == 5 && tar.SequenceEqual("ustar"u8))
                    return Format.LegacyTorch;
            }
            // An empty zip ("PK\x05\x06") is still a zip: let the zip reader explain what is missing.
            if (n >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K')
                return Format.TorchZip;
            return Format.Unknown;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            throw new LoraSharpException(e is FileNotFoundException or DirectoryNotFoundException ? "file not found" : $"cannot open file: {e.Message}", path, inner: e);
        }
    }
}
