using System.IO.MemoryMappedFiles;
using Microsoft.Win32.SafeHandles;

namespace LoraSharp.IO;

/// <summary>How a tensor file's data is read into tensors.</summary>
public enum TensorReadMode
{
    /// <summary>Memory-map the file and copy each tensor's bytes from the mapping into its storage (default).</summary>
    MemoryMap,
    /// <summary>Positional reads (pread) from the file handle straight into each tensor's storage; no mapping.</summary>
    PositionalRead,
}

/// <summary>Read-only random access to a file, by memory mapping or positional reads. Thread-safe for reads.</summary>
internal sealed unsafe class FileBytes : IDisposable
{
    readonly SafeFileHandle _handle;
    readonly MemoryMappedFile? _map;
    readonly MemoryMappedViewAccessor? _view;
    readonly byte* _base;
    int _disposed;

    public string Path { get; }
    public long Length { get; }
    public TensorReadMode Mode { get; }

    public FileBytes(string path, TensorReadMode mode)
    {
        Path = path;
        Mode = mode;
        try
        {
            _handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete, FileOptions.RandomAccess);
            Length = RandomAccess.GetLength(_handle);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            throw new LoraSharpException(e is FileNotFoundException or DirectoryNotFoundException ? "file not found" : $"cannot open file: {e.Message}", path, inner: e);
        }
        if (mode == TensorReadMode.MemoryMap && Length > 0)
        {
            try
            {
                _map = MemoryMappedFile.CreateFromFile(_handle, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
                _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
                byte* p = null;
                _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
                _base = p + _view.PointerOffset;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Dispose();
                throw new LoraSharpException($"cannot memory-map file: {e.Message}", path, inner: e);
            }
        }
    }

    /// <summary>Copies <paramref name="destination"/>.Length bytes from <paramref name="offset"/>; throws when the range leaves the file.</summary>
    public void Read(long offset, Span<byte> destination)
    {
        ObjectDisposedException.ThrowIf(_disposed != 0, this);
        if (offset < 0 || offset > Length - destination.Length)
            throw new LoraSharpException($"read of {destination.Length} bytes at offset {offset} goes beyond the end of the file ({Length} bytes): truncated file", Path);
        if (_base != null)
        {
            new ReadOnlySpan<byte>(_base + offset, destination.Length).CopyTo(destination);
            return;
        }
        while (destination.Length > 0)
        {
            int n = RandomAccess.Read(_handle, destination, offset);
            if (n <= 0)
                throw new LoraSharpException($"file ended early at offset {offset} (was it truncated while open?)", Path);
            destination = destination[n..];
            offset += n;
        }
    }

    public byte[] ReadArray(long offset, int count)
    {
        var a = new byte[count];
        Read(offset, a);
        return a;
    }

    /// <summary>A stream over a byte range (used to inflate compressed zip entries).</summary>
    public Stream OpenRange(long offset, long length) => new RangeStream(this, offset, length);

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        if (_view is not null)
        {
            if (_base != null)
                _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
        }
        _map?.Dispose();
        _handle?.Dispose();
    }

    sealed class RangeStream(FileBytes file, long start, long length) : Stream
    {
        long _pos;
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => length;
        public override long Position { get => _pos; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
        public override int Read(Span<byte> buffer)
        {
            int n = (int)Math.Min(buffer.Length, length - _pos);
            if (n <= 0) return 0;
            file.Read(start + _pos, buffer[..n]);
            _pos += n;
            return n;
        }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
