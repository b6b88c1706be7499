using System.Diagnostics;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// UNet forward time with the real SD1.5 configuration (860M parameters, random weights) at 64×64 latents (512×512
/// images), in float32 and bfloat16. Options: <c>--batch N</c> (default 1; 2 = one CFG step), <c>--runs N</c> (default 3),
/// <c>--dtype f32|bf16|both</c>, <c>--size N</c> (latent side, default 64).
/// </summary>
public static class UNetBenchmark
{
    /// <summary>SD1.5's unet/config.json.</summary>
    public static UNetConfig Sd15 => new()
    {
        BlockOutChannels = [320, 640, 1280, 1280],
        DownBlockTypes = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        UpBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        LayersPerBlock = [2, 2, 2, 2],
        TransformerLayersPerBlock = [1, 1, 1, 1],
        AttentionHeads = [8, 8, 8, 8],
        CrossAttentionDim = 768,
        NormNumGroups = 32,
    };

    /// <summary>SD1.5's text_encoder and vae configs.</summary>
    public static StableDiffusionConfig Sd15Full => new()
    {
        Family = StableDiffusionFamily.SD1,
        Unet = Sd15,
        Vae = new VaeConfig { BlockOutChannels = [128, 256, 512, 512], LayersPerBlock = 2, NormNumGroups = 32 },
        TextEncoder = new ClipTextConfig { HiddenSize = 768, IntermediateSize = 3072, NumHiddenLayers = 12, NumAttentionHeads = 12 },
    };

    public static int Run(string[] args)
    {
        if (args.Contains("--load")) return RunLoad(args);
        int batch = Option(args, "--batch", 1), runs = Option(args, "--runs", 3), size = Option(args, "--size", 64);
        string which = args.SkipWhile(a => a != "--dtype").Skip(1).FirstOrDefault() ?? "both";
        var dtypes = which switch
        {
            "f32" => new[] { ScalarType.Float32 },
            "bf16" => new[] { ScalarType.BFloat16 },
            _ => new[] { ScalarType.Float32, ScalarType.BFloat16 },
        };
        Console.WriteLine($"UNet SD1.5 config, random weights, latents [{batch}, 4, {size}, {size}], context [{batch}, 77, 768], {get_num_threads()} threads");
        var results = new Dictionary<ScalarType, double>();
        foreach (var dtype in dtypes)
        {
            manual_seed(1);
            var build = Stopwatch.StartNew();
            using var unet = new UNet2DConditionModel(Sd15, dtype: dtype);
            unet.eval();
            long parameters = unet.parameters().Sum(p => p.numel());
            Console.WriteLine($"{dtype}: built {parameters / 1e6:F0}M parameters in {build.Elapsed.TotalSeconds:F1} s");
            using var noGrad = no_grad();
            using var latents = randn(batch, 4, size, size).to_type(dtype);
            using var context = randn(batch, 77, 768).to_type(dtype);
            using var t = full(batch, 500L, dtype: ScalarType.Int64);
            var times = new List<double>();
            for (int i = 0; i <= runs; i++)
            {
                using var scope = NewDisposeScope();
                var sw = Stopwatch.StartNew();
                var output = unet.Predict(latents, t, context);
                _ = output.to_type(ScalarType.Float32).sum().item<float>();
                sw.Stop();
                if (i > 0) times.Add(sw.Elapsed.TotalSeconds); // first call warms up
                Console.WriteLine($"  {(i == 0 ? "warm-up" : $"run {i}"),-8} {sw.Elapsed.TotalSeconds:F2} s");
            }
            results[dtype] = times.Min();
            if (args.Contains("--profile")) Profile(unet, latents, t, context);
            double gflop = CountGflop(unet, latents, t, context);
            double matmul = MatmulGflops(dtype);
            Console.WriteLine($"{dtype}: {times.Min():F2} s per forward (best of {runs}), mean {times.Average():F2} s; "
                + $"{gflop:F0} GFLOP per forward → {gflop / times.Min():F0} GFLOP/s (a 2048² matmul in the same run: {matmul:F0} GFLOP/s)");
        }
        if (results.Count == 2)
            Console.WriteLine($"bf16 speed-up over f32: {results[ScalarType.Float32] / results[ScalarType.BFloat16]:F2}×");
        return 0;
    }

    /// <summary>
    /// <c>--load</c>: writes a full SD1.5-shaped single file (random fp16 weights, ~2.1 GB) to a temp folder, then times
    /// <see cref="StableDiffusionModel.Load"/> into fp16 and reports the process RSS before/after and its peak.
    /// </summary>
    static int RunLoad(string[] args)
    {
        var dir = Directory.CreateTempSubdirectory("lorasharp-bench-unet-");
        try
        {
            var path = Path.Combine(dir.FullName, "sd15_random_fp16.safetensors");
            var sw = Stopwatch.StartNew();
            using (var model = new StableDiffusionModel(Sd15Full, dtype: ScalarType.Float16))
                StableDiffusionCheckpoint.Save(model, path);
            Console.WriteLine($"generated {new FileInfo(path).Length / 1e9:F2} GB in {sw.Elapsed.TotalSeconds:F1} s: {path}");
            GC.Collect();
            GC.WaitForPendingFinalizers();
            long before = Environment.WorkingSet;
            using var process = Process.GetCurrentProcess();
            sw.Restart();
            using (var loaded = StableDiffusionModel.Load(path, new StableDiffusionLoadOptions { DType = ScalarType.Float16 }))
            {
                double seconds = sw.Elapsed.TotalSeconds;
                process.Refresh();
                long after = Environment.WorkingSet;
                long bytes = loaded.parameters().Sum(p => p.numel() * 2);
                Console.WriteLine($"loaded {bytes / 1e9:F2} GB of fp16 parameters in {seconds:F1} s ({bytes / 1e9 / seconds:F2} GB/s); "
                    + $"RSS {before / 1e9:F2} → {after / 1e9:F2} GB (+{(after - before) / 1e9:F2}), peak {process.PeakWorkingSet64 / 1e9:F2} GB (includes the generation step)");
                foreach (var r in loaded.LoadReports) Console.WriteLine("  " + r);
            }
            return 0;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    /// <summary>FLOPs of one forward from hooks: Linear and Conv2d multiply-adds, plus attention's QKᵀ and AV products.</summary>
    static double CountGflop(UNet2DConditionModel unet, Tensor latents, Tensor t, Tensor context)
    {
        double flops = 0;
        var removers = new List<Action>();
        foreach (var (_, m) in unet.named_modules())
        {
            switch (m)
            {
                case TorchSharp.Modules.Linear linear:
                    removers.Add(linear.register_forward_hook((mod, input, output) =>
                    {
                        var w = linear.weight!.shape;
                        flops += 2.0 * output.numel() / w[0] * w[0] * w[1];
                        return output;
                    }).remove);
                    break;
                case TorchSharp.Modules.Conv2d conv:
                    removers.Add(conv.register_forward_hook((mod, input, output) =>
                    {
                        var w = conv.weight!.shape;
                        flops += 2.0 * output.numel() * w[1] * w[2] * w[3];
                        return output;
                    }).remove);
                    break;
                case CrossAttention attention:
                    removers.Add(attention.register_forward_hook((mod, x, ctx, output) =>
                    {
                        flops += 4.0 * x.shape[0] * x.shape[1] * ctx.shape[1] * x.shape[2];
                        return output;
                    }).remove);
                    break;
            }
        }
        using (var scope = NewDisposeScope())
            unet.Predict(latents, t, context);
        foreach (var remove in removers) remove();
        return flops / 1e9;
    }

    /// <summary>Time per module type in one forward (self time of leaf modules; CrossAttention includes its projections).</summary>
    static void Profile(UNet2DConditionModel unet, Tensor latents, Tensor t, Tensor context)
    {
        var totals = new Dictionary<string, double>();
        var started = new Dictionary<nn.Module, long>();
        var removers = new List<Action>();
        foreach (var (_, m) in unet.named_modules())
        {
            string? kind = m switch
            {
                TorchSharp.Modules.Conv2d => "Conv2d",
                TorchSharp.Modules.GroupNorm => "GroupNorm",
                TorchSharp.Modules.LayerNorm => "LayerNorm",
                CrossAttention => "CrossAttention (incl. q/k/v/out)",
                GEGLU => "GEGLU (incl. proj)",
                _ => null,
            };
            if (kind is null) continue;
            var module = m;
            Action<nn.Module> pre = _ => started[module] = Stopwatch.GetTimestamp();
            Action<nn.Module> post = _ => totals[kind!] = totals.GetValueOrDefault(kind!) + Stopwatch.GetElapsedTime(started[module]).TotalSeconds;
            switch (m)
            {
                case nn.Module<Tensor, Tensor> one:
                    removers.Add(one.register_forward_pre_hook(pre).remove);
                    removers.Add(one.register_forward_hook(post).remove);
                    break;
                case CrossAttention attention:
                    removers.Add(attention.register_forward_pre_hook(pre).remove);
                    removers.Add(attention.register_forward_hook(post).remove);
                    break;
            }
        }
        var sw = Stopwatch.StartNew();
        using (var scope = NewDisposeScope())
            unet.Predict(latents, t, context);
        double total = sw.Elapsed.TotalSeconds;
        foreach (var remove in removers) remove();
        foreach (var (kind, seconds) in totals.OrderByDescending(kv => kv.Value))
            Console.WriteLine($"    {kind,-34} {seconds,7:F2} s  {100 * seconds / total,5:F1}%");
        Console.WriteLine($"    {"total",-34} {total,7:F2} s");
    }

    static double MatmulGflops(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var a = randn(2048, 2048).to_type(dtype);
        var b = randn(2048, 2048).to_type(dtype);
        a.matmul(b).Dispose();
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < 5; i++) a.matmul(b).Dispose();
        return 5 * 2.0 * 2048 * 2048 * 2048 / sw.Elapsed.TotalSeconds / 1e9;
    }

    static int Option(string[] args, string name, int fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length && int.TryParse(args[i + 1], out int v) ? v : fallback;
    }
}
