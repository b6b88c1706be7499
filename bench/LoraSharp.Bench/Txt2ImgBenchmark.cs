using System.Globalization;
using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.Formats;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Seconds per txt2img step (CFG batch 2) at 512×512 with the SD1.5-shaped model (real config, random weights; no VAE
/// decode), float32 and bfloat16, with 0, 1 and 3 random rank-16 kohya LoRAs (attention + MLP of UNet and text encoder)
/// from prompt tags, unmerged vs merged. Configurations are interleaved over the repetitions; medians of the step times
/// are reported. Options: <c>--steps N</c> (default 2), <c>--reps N</c> (default 2), <c>--dtype f32|bf16|both</c>,
/// <c>--size N</c> (pixels, default 512), <c>--tokenizer DIR</c> (default ../shared/reference/sd/tokenizer).
/// </summary>
public static class Txt2ImgBenchmark
{
    public static int Run(string[] args)
    {
        int steps = Option(args, "--steps", 2), reps = Option(args, "--reps", 2), size = Option(args, "--size", 512);
        string which = Value(args, "--dtype") ?? "both";
        var dtypes = which switch
        {
            "f32" => new[] { ScalarType.Float32 },
            "bf16" => new[] { ScalarType.BFloat16 },
            _ => new[] { ScalarType.Float32, ScalarType.BFloat16 },
        };
        var tokenizerDir = Value(args, "--tokenizer") ?? FindTokenizer();
        var tokenizer = ClipTokenizer.FromFolder(tokenizerDir);
        var loraDir = Directory.CreateTempSubdirectory("lorasharp-bench-loras-").FullName;
        Console.WriteLine($"txt2img SD1.5 config, random weights, {size}x{size}, {steps} steps per run, {reps} interleaved repetitions, {get_num_threads()} threads");
        try
        {
            var table = new List<(string Dtype, int Loras, string Mode, double Median)>();
            foreach (var dtype in dtypes)
            {
                manual_seed(1);
                var build = System.Diagnostics.Stopwatch.StartNew();
                using var model = new StableDiffusionModel(UNetBenchmark.Sd15Full, dtype: dtype, withVae: false);
                model.eval();
                Console.WriteLine($"{dtype}: model built in {build.Elapsed.TotalSeconds:F0} s");
                if (dtype == dtypes[0]) WriteLoras(model, loraDir, 3);
                using var pipe = new Txt2ImgPipeline(model, tokenizer, loras: LoraLibrary.Open(loraDir));
                var configs = new List<(int Loras, bool Merged)> { (0, false), (1, false), (1, true), (3, false), (3, true) };
                var times = configs.ToDictionary(c => c, _ => new List<double>());
                for (int rep = 0; rep < reps; rep++)
                {
                    foreach (var c in configs)
                    {
                        var prompt = "a photo of a cat" + string.Concat(Enumerable.Range(0, c.Loras).Select(i => $" <lora:bench{i}:0.7>"));
                        var request = new Txt2ImgRequest
                        {
                            Prompt = prompt, Steps = steps, Sampler = "Euler", Seed = 1, Width = size, Height = size,
                            MergeLoras = c.Merged, Decode = false,
                        };
                        var sw = System.Diagnostics.Stopwatch.StartNew();
                        using var result = pipe.Generate(request);
                        sw.Stop();
                        times[c].AddRange(result.StepTimes.Select(t => t.TotalSeconds));
                        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                            $"  rep {rep + 1} {dtype} {c.Loras} LoRA {(c.Merged ? "merged  " : "unmerged")}: steps {string.Join(" ", result.StepTimes.Select(t => t.TotalSeconds.ToString("F2", CultureInfo.InvariantCulture)))} s, whole run {sw.Elapsed.TotalSeconds:F1} s"));
                    }
                }
                foreach (var c in configs)
                    table.Add((dtype == ScalarType.Float32 ? "f32" : "bf16", c.Loras, c.Loras == 0 ? "-" : c.Merged ? "merged" : "unmerged", Median(times[c])));
            }
            Console.WriteLine();
            Console.WriteLine("dtype  LoRAs  mode       s/step (median)  vs no LoRA");
            foreach (var row in table)
            {
                var baseline = table.First(r => r.Dtype == row.Dtype && r.Loras == 0).Median;
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{row.Dtype,-6} {row.Loras,5}  {row.Mode,-9}  {row.Median,15:F2}  {row.Median / baseline,9:F2}x"));
            }
            if (table.Any(r => r.Dtype == "f32") && table.Any(r => r.Dtype == "bf16"))
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"bf16 speed-up over f32 without LoRA: {table.First(r => r.Dtype == "f32" && r.Loras == 0).Median / table.First(r => r.Dtype == "bf16" && r.Loras == 0).Median:F2}x"));
            return 0;
        }
        finally
        {
            try { Directory.Delete(loraDir, recursive: true); } catch (IOException) { }
        }
    }

    /// <summary>Random rank-16 LoRAs (alpha 16) on kohya's default targets, written as kohya files bench0…benchN-1.</summary>
    static void WriteLoras(StableDiffusionModel model, string folder, int count)
    {
        var selector = ModuleSelector.Regex(
            @"unet\..*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))",
            @"text_encoder\..*\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))");
        using var host = new AdapterHost(model);
        for (int i = 0; i < count; i++)
        {
            var name = $"bench{i}";
            var adapter = host.Create(name, new AdapterConfig { Rank = 16, Alpha = 16 }, selector);
            using (no_grad())
                foreach (var p in host.TrainableParameters(name)) p.normal_(0, 0.02);
            using var weights = adapter.Export();
            KohyaAdapterWriter.Write(Path.Combine(folder, name + ".safetensors"), weights, new KohyaWriteOptions { NameOf = StableDiffusionLoras.KohyaNameOf(model) });
            Console.WriteLine($"  wrote {name}.safetensors: {adapter.Modules.Count} modules, rank 16, {new FileInfo(Path.Combine(folder, name + ".safetensors")).Length / 1e6:F0} MB");
            host.Detach(name);
        }
    }

    static string FindTokenizer()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "LoraSharp.sln"))) dir = dir.Parent;
        var env = Environment.GetEnvironmentVariable("LORASHARP_REFERENCE_DIR");
        var root = !string.IsNullOrWhiteSpace(env) ? env : Path.Combine(dir?.FullName ?? ".", "..", "shared", "reference");
        return Path.Combine(root, "sd", "tokenizer");
    }

    static double Median(List<double> values)
    {
        var s = values.Order().ToList();
        return s.Count == 0 ? double.NaN : s.Count % 2 == 1 ? s[s.Count / 2] : (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
    }

    static int Option(string[] args, string name, int fallback) =>
        Value(args, name) is { } v ? int.Parse(v, CultureInfo.InvariantCulture) : fallback;

    static string? Value(string[] args, string name) => args.SkipWhile(a => a != name).Skip(1).FirstOrDefault();
}
