using System.Diagnostics;
using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// The LoRA tools on an SD1.5-sized model: generates a random fp16 SD1.5 single file (~2.1 GB, real UNet/TE/VAE configs)
/// and a random rank-R kohya LoRA (default 128) on every module a LoRA network targets, in a temp folder; then, each in a
/// child process so its peak RSS (VmHWM) is its own: merge (base + LoRA → tuned), extract (auto SVD and full-SVD
/// baseline), resize (factored SVD and full-SVD baseline). Options: <c>--rank N</c>, <c>--extract-rank N</c>,
/// <c>--resize-rank N</c>, <c>--full-extract</c> (also a whole full-SVD extraction as baseline: slow), <c>--keep DIR</c> (work in DIR,
/// keep files). The SVD speed-ups are measured interleaved per module (<c>--svd-compare</c>, <c>--resize-compare</c>).
/// </summary>
public static class ToolsBenchmark
{
    public static int Run(string[] args)
    {
        if (args.Length > 0 && args[0] == "--child") return Child(args[1..]);
        if (args.Length > 0 && args[0] == "--svd-compare") return SvdCompare(args[1..]);
        if (args.Length > 0 && args[0] == "--resize-compare") return ResizeCompare(args[1..]);
        int rank = Option(args, "--rank", 128), extractRank = Option(args, "--extract-rank", rank), resizeRank = Option(args, "--resize-rank", 32);
        bool fullExtract = args.Contains("--full-extract");
        int keepAt = Array.IndexOf(args, "--keep");
        var dir = keepAt >= 0 ? Directory.CreateDirectory(args[keepAt + 1]) : Directory.CreateTempSubdirectory("lorasharp-bench-tools-");
        Console.WriteLine($"work folder {dir.FullName}, {get_num_threads()} threads");
        try
        {
            var basePath = Path.Combine(dir.FullName, "sd15_base_fp16.safetensors");
            var loraPath = Path.Combine(dir.FullName, $"lora_r{rank}.safetensors");
            var tunedPath = Path.Combine(dir.FullName, "sd15_tuned_fp16.safetensors");
            if (!File.Exists(basePath)) RunChild("generate-base", basePath);
            if (!File.Exists(loraPath)) RunChild("generate-lora", basePath, loraPath, rank.ToString(CultureInfo.InvariantCulture));
            Console.WriteLine($"base {Gb(basePath):F2} GB, LoRA r{rank} {Gb(loraPath) * 1000:F0} MB");

            var merge = RunChild("merge", basePath, loraPath, tunedPath);
            Console.WriteLine($"merge: {merge.Seconds:F1} s, {merge.Memory} (output {Gb(tunedPath):F2} GB)   {merge.Line}");

            var extracted = Path.Combine(dir.FullName, "extracted_auto.safetensors");
            var auto = RunChild("extract", basePath, tunedPath, extracted, extractRank.ToString(CultureInfo.InvariantCulture), "auto");
            Console.WriteLine($"extract r{extractRank} (auto SVD): {auto.Seconds:F1} s, {auto.Memory} (output {Gb(extracted) * 1000:F0} MB)   {auto.Line}");
            if (fullExtract)
            {
                var extractedFull = Path.Combine(dir.FullName, "extracted_full.safetensors");
                var full = RunChild("extract", basePath, tunedPath, extractedFull, extractRank.ToString(CultureInfo.InvariantCulture), "full");
                Console.WriteLine($"extract r{extractRank} (full SVD baseline): {full.Seconds:F1} s, {full.Memory}   {full.Line}");
                Console.WriteLine($"extraction speed-up auto / full SVD: {full.Seconds / auto.Seconds:F2}×");
            }
            // Interleaved per module (both methods see the same machine load): the SVD speed-up and agreement.
            Console.WriteLine(RunPlain("--svd-compare", basePath, tunedPath, "--rank", extractRank.ToString(CultureInfo.InvariantCulture), "--modules", "12"));
            Console.WriteLine(RunPlain("--resize-compare", loraPath, "--rank", resizeRank.ToString(CultureInfo.InvariantCulture), "--modules", "33"));
            var resized = Path.Combine(dir.FullName, "resized.safetensors");
            var fast = RunChild("resize", loraPath, resized, resizeRank.ToString(CultureInfo.InvariantCulture), "factored");
            Console.WriteLine($"resize r{rank}→{resizeRank} (whole file, factored SVD): {fast.Seconds:F1} s, {fast.Memory}   {fast.Line}");
            return 0;
        }
        finally
        {
            if (keepAt < 0) dir.Delete(recursive: true);
        }
    }

    /// <summary>Runs this benchmark with other arguments in a child process and returns its last output line.</summary>
    static string RunPlain(params string[] benchArgs)
    {
        var self = Environment.ProcessPath!;
        var psi = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet") psi.ArgumentList.Add(typeof(ToolsBenchmark).Assembly.Location);
        foreach (var a in new[] { "tools" }.Concat(benchArgs)) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var lines = new List<string>();
        string? line;
        while ((line = p.StandardOutput.ReadLine()) is not null) lines.Add(line);
        p.WaitForExit();
        return lines.LastOrDefault() ?? "";
    }

    static double Gb(string path) => new FileInfo(path).Length / 1e9;

    sealed record ChildResult(double Seconds, double PeakGb, double PeakAnonGb, string Line)
    {
        public string Memory => $"peak RSS {PeakGb:F2} GB (VmHWM, incl. mapped input pages), peak anonymous {PeakAnonGb:F2} GB";
    }

    /// <summary>Runs this benchmark in a child process; returns its wall time, its VmHWM and its last output line.</summary>
    static ChildResult RunChild(params string[] childArgs)
    {
        var self = Environment.ProcessPath!;
        var psi = new ProcessStartInfo(self) { RedirectStandardOutput = true, UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet") psi.ArgumentList.Add(typeof(ToolsBenchmark).Assembly.Location);
        foreach (var a in new[] { "tools", "--child" }.Concat(childArgs)) psi.ArgumentList.Add(a);
        var sw = Stopwatch.StartNew();
        using var p = Process.Start(psi)!;
        var lines = new List<string>();
        string? line;
        while ((line = p.StandardOutput.ReadLine()) is not null) lines.Add(line);
        p.WaitForExit();
        double seconds = sw.Elapsed.TotalSeconds;
        if (p.ExitCode != 0) throw new InvalidOperationException($"child {string.Join(' ', childArgs)} failed ({p.ExitCode}): {string.Join('\n', lines.TakeLast(20))}");
        var peak = lines.LastOrDefault(l => l.StartsWith("PEAK_RSS_KB=", StringComparison.Ordinal));
        double peakGb = peak is null ? double.NaN : long.Parse(peak["PEAK_RSS_KB=".Length..], CultureInfo.InvariantCulture) * 1024 / 1e9;
        var anon = lines.LastOrDefault(l => l.StartsWith("PEAK_ANON_KB=", StringComparison.Ordinal));
        double anonGb = anon is null ? double.NaN : long.Parse(anon["PEAK_ANON_KB=".Length..], CultureInfo.InvariantCulture) * 1024 / 1e9;
        return new ChildResult(seconds, peakGb, anonGb, lines.LastOrDefault(l => !l.StartsWith("PEAK_", StringComparison.Ordinal)) ?? "");
    }

    static int Child(string[] a)
    {
        // VmHWM counts the file-backed pages of the memory-mapped inputs too (clean page cache the kernel can drop);
        // sample RssAnon (the process's own memory) to report the peak of what the tool allocates.
        long peakAnonKb = 0;
        bool done = false;
        var sampler = new Thread(() =>
        {
            while (!Volatile.Read(ref done))
            {
                peakAnonKb = Math.Max(peakAnonKb, StatusKb("RssAnon:"));
                Thread.Sleep(20);
            }
        }) { IsBackground = true };
        sampler.Start();
        int code = ChildStep(a);
        Volatile.Write(ref done, true);
        sampler.Join();
        peakAnonKb = Math.Max(peakAnonKb, StatusKb("RssAnon:"));
        Console.WriteLine("PEAK_ANON_KB=" + peakAnonKb.ToString(CultureInfo.InvariantCulture));
        Console.WriteLine("PEAK_RSS_KB=" + StatusKb("VmHWM:").ToString(CultureInfo.InvariantCulture));
        return code;
    }

    static long StatusKb(string field)
    {
        var line = File.ReadAllLines("/proc/self/status").FirstOrDefault(l => l.StartsWith(field, StringComparison.Ordinal));
        return line is null ? 0 : long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture);
    }

    static int ChildStep(string[] a)
    {
        switch (a[0])
        {
            case "generate-base":
            {
                manual_seed(1);
                using (var model = new StableDiffusionModel(UNetBenchmark.Sd15Full, dtype: ScalarType.Float16))
                    StableDiffusionCheckpoint.Save(model, a[1]);
                break;
            }
            case "generate-lora":
                GenerateLora(a[1], a[2], int.Parse(a[3], CultureInfo.InvariantCulture));
                break;
            case "merge":
            {
                var r = LoraMerger.MergeIntoModel(a[1], [new LoraInput(a[2], 1.0)], a[3]);
                Console.WriteLine($"{r.ModulesChanged} modules merged, {r.TensorsCopied} tensors copied");
                break;
            }
            case "extract":
            {
                var method = a[5] == "full" ? SvdMethod.Full : SvdMethod.Auto;
                var r = LoraExtractor.Extract(a[1], a[2], a[3], new ExtractOptions { Rank = int.Parse(a[4], CultureInfo.InvariantCulture), SvdMethod = method });
                Console.WriteLine($"{r.Modules.Count} modules, {r.Modules.Count(m => m.Method == SvdMethod.Randomized)} randomized, mean energy kept {r.Modules.Average(m => m.EnergyRetained):P3}, "
                    + $"SVD time {r.Modules.Sum(m => m.Seconds):F1} s");
                break;
            }
            case "resize":
            {
                var r = LoraResizer.Resize(a[1], a[2], new ResizeOptions { Rank = int.Parse(a[3], CultureInfo.InvariantCulture), FullSvd = a[4] == "full" });
                Console.WriteLine($"{r.Modules.Count} modules, mean fro retained {r.Modules.Average(m => m.FroRetained):P2}");
                break;
            }
            default:
                Console.Error.WriteLine($"unknown child step {a[0]}");
                return 2;
        }
        return 0;
    }

    /// <summary>A random kohya LoRA (fp16, alpha = rank) on every module a LoRA network targets in the model.</summary>
    static void GenerateLora(string model, string output, int rank)
    {
        using var ckpt = ModelCheckpoint.Open(model);
        var gen = new Generator(7);
        var modules = new List<ModuleAdapterWeights>();
        foreach (var path in ckpt.LoraTargets(withConv: false))
        {
            var shape = ckpt.Index.WeightShape(path);
            long outF = shape[0], fanIn = shape.Skip(1).Aggregate(1L, (x, y) => x * y);
            int r = (int)Math.Min(rank, Math.Min(outF, shape[1]));
            long[] downShape = shape.Length == 4 ? [r, shape[1], shape[2], shape[3]] : [r, fanIn];
            long[] upShape = shape.Length == 4 ? [outF, r, 1, 1] : [outF, r];
            // ΔW entries ~ 1e-3·(unit scale): a realistic LoRA magnitude next to fp16 weights.
            var down = randn(downShape, generator: gen).mul(1.0 / Math.Sqrt(fanIn)).to_type(ScalarType.Float16);
            var up = randn(upShape, generator: gen).mul(1e-2 / Math.Sqrt(r)).to_type(ScalarType.Float16);
            modules.Add(new ModuleAdapterWeights
            {
                ModulePath = path, Algorithm = AdapterAlgorithm.LoRA,
                Tensors = new Dictionary<string, Tensor> { ["lora_down"] = down, ["lora_up"] = up }, Alpha = r,
            });
        }
        using var weights = new AdapterWeights { Name = Path.GetFileNameWithoutExtension(output), Modules = modules };
        KohyaAdapterWriter.Write(output, weights);
        Console.WriteLine($"{modules.Count} modules");
    }

    /// <summary>
    /// <c>--svd-compare BASE TUNED [--rank R] [--modules N]</c>: for the N largest extraction targets, ΔW's truncated SVD with
    /// Auto and with the full SVD, interleaved per module (so both see the same machine load): time ratio and the largest
    /// difference between the two rank-R reconstructions relative to the largest entry of ΔW.
    /// </summary>
    static int SvdCompare(string[] args)
    {
        int rank = Option(args, "--rank", 128), count = Option(args, "--modules", 24);
        using var baseModel = ModelCheckpoint.Open(args[0]);
        using var tuned = ModelCheckpoint.Open(args[1]);
        var targets = baseModel.LoraTargets(withConv: false)
            .OrderByDescending(t => baseModel.Index.WeightShape(t).Aggregate(1L, (a, b) => a * b)).ThenBy(t => t, StringComparer.Ordinal).Take(count).ToList();
        double tAuto = 0, tFull = 0, worst = 0;
        int randomized = 0;
        foreach (var t in targets)
        {
            using var scope = NewDisposeScope();
            var delta = tuned.LoadWeight(t, ScalarType.Float32).sub(baseModel.LoadWeight(t, ScalarType.Float32));
            var m = delta.reshape(delta.shape[0], -1);
            var sw = Stopwatch.StartNew();
            using var auto = LowRank.Svd(m, rank, SvdMethod.Auto, seed: 1);
            double a = sw.Elapsed.TotalSeconds;
            sw.Restart();
            using var full = LowRank.Svd(m, rank, SvdMethod.Full);
            double f = sw.Elapsed.TotalSeconds;
            tAuto += a;
            tFull += f;
            if (auto.Method == SvdMethod.Randomized) randomized++;
            var ra = auto.U.mul(auto.S).matmul(auto.Vh);
            var rf = full.U.mul(full.S).matmul(full.Vh);
            double rel = ra.sub(rf).abs().max().item<float>() / m.abs().max().item<float>();
            worst = Math.Max(worst, rel);
            Console.WriteLine($"{t,-75} [{string.Join("×", m.shape)}] {auto.Method,-10} auto {a:F2} s, full {f:F2} s, max |recon diff|/max|ΔW| {rel:E1}");
        }
        Console.WriteLine($"{targets.Count} modules, {randomized} randomized: auto {tAuto:F1} s, full {tFull:F1} s → {tFull / tAuto:F2}×; worst relative reconstruction difference {worst:E1}");
        return 0;
    }

    /// <summary>
    /// <c>--resize-compare LORA [--rank R]</c>: every module resized with the factored SVD and with kohya's full SVD of
    /// up·down, interleaved per module: time ratio and the largest ΔW difference.
    /// </summary>
    static int ResizeCompare(string[] args)
    {
        int rank = Option(args, "--rank", 32), count = Option(args, "--modules", int.MaxValue);
        using var loaded = AdapterFile.Read(args[0]);
        double tFast = 0, tFull = 0, worst = 0;
        int done = 0;
        // Every step-th module, so the subset has every kind (TE, attention, MLP; every width).
        var modules = loaded.Weights.Modules.Where((_, i) => i % Math.Max(1, loaded.Weights.Modules.Count / Math.Min(count, loaded.Weights.Modules.Count)) == 0).Take(count).ToList();
        foreach (var m in modules)
        {
            using var scope = NewDisposeScope();
            var sw = Stopwatch.StartNew();
            using var a = LoraResizer.ResizeModule(m, new ResizeOptions { Rank = rank }, null, out _);
            tFast += sw.Elapsed.TotalSeconds;
            sw.Restart();
            using var b = LoraResizer.ResizeModule(m, new ResizeOptions { Rank = rank, FullSvd = true }, null, out _);
            tFull += sw.Elapsed.TotalSeconds;
            Tensor D(ModuleAdapterWeights w) => w["lora_up"].to_type(ScalarType.Float32).reshape(w["lora_up"].shape[0], -1)
                .matmul(w["lora_down"].to_type(ScalarType.Float32).reshape(w["lora_down"].shape[0], -1)).mul(AdapterScales.Scale(w));
            var da = D(a);
            worst = Math.Max(worst, da.sub(D(b)).abs().max().item<float>() / da.abs().max().item<float>());
            Console.WriteLine($"{++done,4} {m.ModulePath,-80} [{a["lora_up"].shape[0]}×{a["lora_down"].shape[1]}] cumulative factored {tFast:F2} s, full {tFull:F1} s");
        }
        Console.WriteLine($"resize {modules.Count} modules → rank {rank}: factored SVD {tFast:F1} s, full SVD of up·down {tFull:F1} s → {tFull / tFast:F1}×; "
            + $"worst relative ΔW difference {worst:E1}");
        return 0;
    }

    static int Option(string[] args, string name, int fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length && int.TryParse(args[i + 1], out int v) ? v : fallback;
    }
}
