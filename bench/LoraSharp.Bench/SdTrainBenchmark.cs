using System.Diagnostics;
using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Training.Diffusion;
using LoraSharp.Training.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Seconds per LoRA training step with SD1.5's UNet + text encoder configuration (random weights), batch 1 at 512 px
/// (64×64 latents), LoRA dim 16 on kohya's targets (UNet transformer children + CLIP attention/MLP), AdamW — in float32
/// and bf16, each with and without gradient checkpointing (four rows by default). Each variant runs in its own child
/// process so the peak RSS (VmHWM) belongs to that variant. Options: <c>--steps N</c> (timed steps after one warm-up,
/// default 2), <c>--precision fp32|bf16</c> and/or <c>--checkpointing on|off</c> (a subset of the rows), or
/// <c>--variants f32,f32-ckpt,bf16,bf16-ckpt</c>, <c>--size N</c> (latent side, default 64), <c>--threads N</c> (torch
/// threads in each child; default: libtorch's).
/// </summary>
public static class SdTrainBenchmark
{
    static readonly string[] AllVariants = ["f32", "f32-ckpt", "bf16", "bf16-ckpt"];

    static int Option(string[] args, string name, int fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
    }

    static string? StringOption(string[] args, string name)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
    }

    /// <summary>The variants the options ask for (all four by default), in the table's order.</summary>
    public static IReadOnlyList<string> Variants(string[] args)
    {
        if (StringOption(args, "--variants") is { } list)
        {
            var asked = list.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
            var unknown = asked.Except(AllVariants).ToList();
            if (unknown.Count > 0) throw new ArgumentException($"unknown variant(s) {string.Join(", ", unknown)} (expected {string.Join(", ", AllVariants)})");
            return asked;
        }
        var precision = StringOption(args, "--precision")?.ToLowerInvariant();
        string? prefix = precision switch
        {
            null => null,
            "fp32" or "f32" or "float32" => "f32",
            "bf16" or "bfloat16" => "bf16",
            _ => throw new ArgumentException($"--precision {precision}: expected fp32 or bf16"),
        };
        var ckpt = StringOption(args, "--checkpointing")?.ToLowerInvariant();
        bool? withCkpt = ckpt switch
        {
            null => null,
            "on" or "true" or "1" => true,
            "off" or "false" or "0" => false,
            _ => throw new ArgumentException($"--checkpointing {ckpt}: expected on or off"),
        };
        return AllVariants.Where(v => (prefix is null || v.StartsWith(prefix + "-", StringComparison.Ordinal) || v == prefix)
                                      && (withCkpt is null || v.EndsWith("-ckpt", StringComparison.Ordinal) == withCkpt)).ToList();
    }

    static string LoadAverage() => File.Exists("/proc/loadavg") ? string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "n/a";

    public static int Run(string[] args)
    {
        int threads = Option(args, "--threads", 0);
        int ci = Array.IndexOf(args, "--child");
        if (ci >= 0)
        {
            if (threads > 0) set_num_threads(threads);
            return Child(args[ci + 1], Option(args, "--steps", 2), Option(args, "--size", 64));
        }
        int steps = Option(args, "--steps", 2), size = Option(args, "--size", 64);
        IReadOnlyList<string> variants;
        try { variants = Variants(args); }
        catch (ArgumentException e) { Console.Error.WriteLine(e.Message); return 2; }
        if (threads > 0) set_num_threads(threads);
        Console.WriteLine($"SD1.5 LoRA dim 16 training step, batch 1, latents {size}x{size} ({size * 8} px), random weights, {steps} timed step(s) per variant, " +
                          $"{get_num_threads()} torch thread(s); load average at start {LoadAverage()}");
        Console.WriteLine("| variant | s/step (median) | steps | peak RSS | expected peak (planner) | load average after |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (var v in variants)
        {
            var psi = new ProcessStartInfo(Environment.ProcessPath!) { RedirectStandardOutput = true, UseShellExecute = false };
            if (Path.GetFileNameWithoutExtension(Environment.ProcessPath!) == "dotnet")
                psi.ArgumentList.Add(typeof(SdTrainBenchmark).Assembly.Location);
            foreach (var a in new[] { "sd-train", "--child", v, "--steps", steps.ToString(CultureInfo.InvariantCulture), "--size", size.ToString(CultureInfo.InvariantCulture),
                                      "--threads", threads.ToString(CultureInfo.InvariantCulture) })
                psi.ArgumentList.Add(a);
            using var p = Process.Start(psi)!;
            var output = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            var line = output.Split('\n').LastOrDefault(l => l.StartsWith("RESULT ", StringComparison.Ordinal));
            Console.WriteLine((line is null ? $"| {v} | failed (exit {p.ExitCode}) | | | |" : line["RESULT ".Length..]) + $" {LoadAverage()} |");
        }
        return 0;
    }

    static long PeakRssBytes()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
        return 0;
    }

    static int Child(string variant, int steps, int size)
    {
        var dtype = variant.StartsWith("bf16", StringComparison.Ordinal) ? ScalarType.BFloat16 : ScalarType.Float32;
        bool ckpt = variant.EndsWith("-ckpt", StringComparison.Ordinal);
        manual_seed(1);
        var cfg = UNetBenchmark.Sd15Full with { Vae = null };
        using var model = new StableDiffusionModel(cfg, dtype: dtype, withVae: false);
        using var host = new AdapterHost(model);
        host.FreezeBase();
        var selector = ModuleSelector.Regex(NetworkSpec.UnetAttentionPattern, NetworkSpec.TextEncoderPattern);
        var lora = host.Create("bench", new AdapterConfig { Rank = 16, Alpha = 8 }, selector);
        var named = host.NamedTrainableParameters();
        using var opt = OptimizerFactory.Create("AdamW", [
            new ParamGroup("unet", named.Where(n => n.Name.Contains("/unet.")).Select(n => n.Param).ToList(), 1e-4),
            new ParamGroup("te", named.Where(n => n.Name.Contains("/text_encoder.")).Select(n => n.Param).ToList(), 5e-5)]);
        using var gc = ckpt ? GradientCheckpointing.Apply(model.Unet) : null;
        var plan = MemoryPlanner.Plan(new MemoryPlanInput
        {
            Unet = cfg.Unet, ModelBytes = model.parameters().Sum(p => p.numel() * p.element_size()), AdapterParameters = named.Sum(n => n.Param.numel()),
            BatchSize = 1, MaxImageSize = (size * 8, size * 8), ActivationBytes = dtype == ScalarType.Float32 ? 4 : 2, Optimizer = "AdamW",
        }, availableBytes: long.MaxValue / 4, forceCheckpointing: ckpt);
        var noise = new DiffusionNoise();
        model.train();
        var times = new List<double>();
        for (int s = 0; s <= steps; s++)
        {
            var sw = Stopwatch.StartNew();
            using (var scope = NewDisposeScope())
            {
                var ids = randint(0, 49407, [1, 77], dtype: ScalarType.Int64);
                var ctx = model.TextEncoder!.Encode(ids);
                var latents = randn(1, 4, size, size);
                var eps = randn(1, 4, size, size);
                var t = randint(0, 1000, [1], dtype: ScalarType.Int64);
                var noisy = noise.AddNoise(latents, eps, t).to_type(dtype);
                var pred = model.Unet.Predict(noisy, t, ctx).to_type(ScalarType.Float32);
                var loss = (pred - eps).pow(2).mean();
                loss.backward();
            }
            opt.Step();
            opt.ZeroGrad();
            GC.Collect();
            GC.WaitForPendingFinalizers();
            if (s > 0) times.Add(sw.Elapsed.TotalSeconds);
            Console.Error.WriteLine($"{variant} step {s}: {sw.Elapsed.TotalSeconds:F2} s");
        }
        times.Sort();
        double median = times[times.Count / 2];
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"RESULT | {variant} | {median:F2} | {steps} | {PeakRssBytes() / 1e9:F2} GB | {plan.ExpectedPeakBytes / 1e9:F2} GB |"));
        return 0;
    }
}
