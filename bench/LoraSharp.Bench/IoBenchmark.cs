using System.Diagnostics;
using System.Globalization;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Loading every tensor of a ~1 GB file (open + Load each key, tensors kept alive like a model load) against the
/// floor for any loader that fills new memory: File.ReadAllBytes of the same, page-cached file. Both formats, both
/// read modes. Options: --gb N (file size, default 1), --runs N (default 5), --dir PATH (default /tmp), --keep.
/// Prints medians and ratios plain-read time / load time (1.0 = as fast as the plain read; target ≥ 0.8) for three
/// plain reads: File.ReadAllBytes (managed array), one malloc'd buffer, and one malloc'd buffer per tensor (the same
/// allocation pattern as the loader, the fairest floor). Fresh-memory page faults dominate on VMs: run once more with
/// MALLOC_MMAP_THRESHOLD_=131072 to give every tensor-sized allocation fresh pages on both sides.
/// </summary>
public static class IoBenchmark
{
    public static int Run(string[] args)
    {
        double gb = 1;
        int runs = 5;
        string dir = "/tmp";
        bool keep = false;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--gb": gb = double.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--runs": runs = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--dir": dir = args[++i]; break;
                case "--keep": keep = true; break;
                default: Console.Error.WriteLine($"unknown option {args[i]}"); return 2;
            }
        }
        var st = Path.Combine(dir, $"lorasharp-bench-{Environment.ProcessId}.safetensors");
        var ckpt = Path.Combine(dir, $"lorasharp-bench-{Environment.ProcessId}.ckpt");
        try
        {
            var specs = Specs(gb);
            var sw = Stopwatch.StartNew();
            SafetensorsWriter.Write(st, specs);
            Console.WriteLine($"wrote {st}: {new FileInfo(st).Length / 1e9:0.000} GB, {specs.Count} tensors in {sw.Elapsed.TotalSeconds:0.0} s");
            sw.Restart();
            TorchCheckpointWriter.Write(ckpt, specs, wrapKey: "state_dict");
            Console.WriteLine($"wrote {ckpt}: {new FileInfo(ckpt).Length / 1e9:0.000} GB in {sw.Elapsed.TotalSeconds:0.0} s");
            Console.WriteLine($"torch threads {get_num_threads()}, {runs} runs each, medians; page cache warmed by one read of each file first; " +
                              $"MALLOC_MMAP_THRESHOLD_={Environment.GetEnvironmentVariable("MALLOC_MMAP_THRESHOLD_") ?? "(unset: glibc may reuse freed memory)"}");
            Console.WriteLine();
            foreach (var path in new[] { st, ckpt })
            {
                _ = File.ReadAllBytes(path); // warm the page cache
                Collect();
                foreach (var mode in new[] { TensorReadMode.MemoryMap, TensorReadMode.PositionalRead })
                    Measure(path, mode, runs);
            }
            return 0;
        }
        finally
        {
            if (!keep)
            {
                File.Delete(st);
                File.Delete(ckpt);
            }
        }
    }

    /// <summary>A model-like mix: mostly 16 MiB fp32 matrices, some bf16/fp16, a few small tensors.</summary>
    static List<PendingTensor> Specs(double gb)
    {
        var list = new List<PendingTensor>();
        long target = (long)(gb * 1e9), total = 0;
        int i = 0;
        while (total < target)
        {
            (ScalarType dt, long[] shape) = (i % 8) switch
            {
                6 => (ScalarType.BFloat16, new long[] { 4096, 2048 }),
                7 => (ScalarType.Float16, new long[] { 2048, 4096 }),
                _ => (ScalarType.Float32, new long[] { 2048, 2048 }),
            };
            int seed = i;
            list.Add(new PendingTensor($"model.layers.{i / 8}.w{i % 8}.weight", dt, shape, () => rand(shape, generator: new Generator((ulong)seed)).to_type(dt)));
            list.Add(new PendingTensor($"model.layers.{i / 8}.w{i % 8}.bias", ScalarType.Float32, [shape[0]], () => zeros(shape[0])));
            total += 16L << 20;
            total += shape[0] * 4;
            i++;
        }
        return list;
    }

    static void Collect()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
    }

    static double Median(List<double> xs)
    {
        xs.Sort();
        return xs.Count % 2 == 1 ? xs[xs.Count / 2] : (xs[xs.Count / 2 - 1] + xs[xs.Count / 2]) / 2;
    }

    /// <summary>(b) the plain read: the whole file into fresh memory, sequentially.</summary>
    static double TimeReadAllBytes(string path)
    {
        var sw = Stopwatch.StartNew();
        var all = File.ReadAllBytes(path);
        double t = sw.Elapsed.TotalSeconds;
        GC.KeepAlive(all);
        return t;
    }

    /// <summary>(b') the same into a fresh native buffer (malloc'd like tensor storage), in 64 MiB reads.</summary>
    static unsafe double TimeReadNative(string path)
    {
        long length = new FileInfo(path).Length;
        var sw = Stopwatch.StartNew();
        byte* buffer = (byte*)System.Runtime.InteropServices.NativeMemory.Alloc((nuint)length);
        try
        {
            using var handle = File.OpenHandle(path);
            long offset = 0;
            while (offset < length)
            {
                int n = RandomAccess.Read(handle, new Span<byte>(buffer + offset, (int)Math.Min(64L << 20, length - offset)), offset);
                if (n <= 0) throw new EndOfStreamException();
                offset += n;
            }
            return sw.Elapsed.TotalSeconds;
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.Free(buffer);
        }
    }

    /// <summary>
    /// (b'') the plain read with the loader's allocation pattern: the file read sequentially into one malloc'd buffer
    /// per tensor-sized piece (same sizes, same allocator as tensor storage), all kept alive to the end.
    /// </summary>
    static unsafe double TimeReadNativePieces(string path, long[] pieces)
    {
        var sw = Stopwatch.StartNew();
        var buffers = new List<nint>(pieces.Length);
        try
        {
            using var handle = File.OpenHandle(path);
            long offset = 0, length = RandomAccess.GetLength(handle);
            foreach (var size in pieces.Append(length - pieces.Sum()))
            {
                if (size <= 0) continue;
                byte* b = (byte*)System.Runtime.InteropServices.NativeMemory.Alloc((nuint)size);
                buffers.Add((nint)b);
                for (long done = 0; done < size;)
                {
                    int n = RandomAccess.Read(handle, new Span<byte>(b + done, (int)Math.Min(1L << 30, size - done)), offset + done);
                    if (n <= 0) throw new EndOfStreamException();
                    done += n;
                }
                offset += size;
            }
            return sw.Elapsed.TotalSeconds;
        }
        finally
        {
            foreach (var b in buffers) System.Runtime.InteropServices.NativeMemory.Free((void*)b);
        }
    }

    /// <summary>(a) open + load every tensor, keeping them alive until the end as a model load does.</summary>
    static (double Seconds, double OpenMs) TimeLoad(string path, TensorReadMode mode)
    {
        var sw = Stopwatch.StartNew();
        using var scope = NewDisposeScope();
        using var source = TensorFiles.Open(path, mode);
        double open = sw.Elapsed.TotalMilliseconds;
        long loaded = 0;
        foreach (var key in source.Keys)
            loaded += source.Load(key).numel();
        double t = sw.Elapsed.TotalSeconds;
        if (loaded == 0) throw new InvalidOperationException("nothing loaded");
        return (t, open);
    }

    static void Measure(string path, TensorReadMode mode, int runs)
    {
        long bytes = new FileInfo(path).Length;
        var load = new List<double>();
        var read = new List<double>();
        var native = new List<double>();
        var open = new List<double>();
        var pieces = new List<double>();
        long[] sizes;
        using (var f = TensorFiles.Open(path))
            sizes = f.Keys.Select(k => f.Info(k).ByteLength).ToArray();
        for (int r = 0; r < runs; r++)
        {
            // Alternate the order so allocator and cache state favour neither side.
            var steps = new Action[]
            {
                () => read.Add(TimeReadAllBytes(path)),
                () => native.Add(TimeReadNative(path)),
                () => pieces.Add(TimeReadNativePieces(path, sizes)),
                () => { var (t, o) = TimeLoad(path, mode); load.Add(t); open.Add(o); },
            };
            for (int k = 0; k < steps.Length; k++)
            {
                steps[(k + r) % steps.Length]();
                Collect();
            }
        }
        double a = Median(load), b = Median(read), c = Median(native), d = Median(pieces);
        Console.WriteLine(
            $"{Path.GetExtension(path),-12} {mode,-14} open {Median(open),5:0.0} ms | load all {a:0.000} s ({bytes / a / 1e9:0.00} GB/s) | " +
            $"ReadAllBytes {b:0.000} s, ratio {b / a:0.00} | 1 malloc+read {c:0.000} s, ratio {c / a:0.00} | " +
            $"malloc+read per tensor {d:0.000} s, ratio {d / a:0.00}");
    }
}
