using System.Globalization;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Diffusion;
using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

/// <summary>
/// Pixel-space learning check on the pretrained demo model (models/demo: a real tiny SD 1.x whose VAE renders colours
/// and backgrounds, not fine shapes): a LoRA trained on a few images of a yellow circle on a white background,
/// captioned "a yellow circle on a sks background" — for the untrained trigger word the base draws a dark background —
/// moves the background the txt2img pipeline generates for that prompt (mean colour of the border ring, same seeds)
/// toward the training images' white, and keeps the yellow circle, while the base weights stay bit-identical.
/// (A colour the demo VAE never saw, e.g. cyan, is not usable: its decoder cannot render it.)
/// </summary>
[Collection(LoraSharp.Tests.Training.LlmTraining.TorchGlobalStateCollection.Name)]
public class DemoModelLearningTests
{
    static string DemoModel => Path.Combine(ReferenceData.RepoRoot, "models", "demo", "demo-sd.safetensors");
    static string DemoTokenizer => Path.Combine(ReferenceData.RepoRoot, "models", "demo", "tokenizer");

    static readonly SKColor Background = new(245, 245, 245);
    static readonly SKColor Yellow = new(240, 210, 30);
    const string Caption = "a yellow circle on a sks background, center";

    /// <summary>
    /// The side the demo model was trained at: the checkpoint's <c>modelspec.resolution</c> ("WxH") when it has one, else
    /// <see cref="LoraSharp.Demo.DemoModel.ImageSize"/> (the demo model's definition), so a re-trained larger demo model is picked up.
    /// </summary>
    static int ImageSize(string path)
    {
        using var file = SafetensorsFile.Open(path);
        if (file.Metadata.TryGetValue("modelspec.resolution", out var res) && int.TryParse(res.Split('x')[0], NumberStyles.Integer, CultureInfo.InvariantCulture, out var w))
            return w;
        return LoraSharp.Demo.DemoModel.ImageSize;
    }

    /// <summary>A yellow circle (slightly jittered) on a flat cyan background with a little per-pixel noise.</summary>
    static void WriteImage(string path, int size, int seed)
    {
        var rng = new Random(seed);
        using var bmp = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using (var canvas = new SKCanvas(bmp))
        {
            canvas.Clear(Background);
            using var paint = new SKPaint { Color = Yellow, IsAntialias = true, Style = SKPaintStyle.Fill };
            float r = size * (0.31f + 0.03f * (float)rng.NextDouble());
            canvas.DrawCircle(size * (0.5f + 0.03f * (float)(rng.NextDouble() - 0.5)), size * (0.5f + 0.03f * (float)(rng.NextDouble() - 0.5)), r, paint);
        }
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
            {
                var c = bmp.GetPixel(x, y);
                int j = rng.Next(-6, 7);
                bmp.SetPixel(x, y, new SKColor((byte)Math.Clamp(c.Red + j, 0, 255), (byte)Math.Clamp(c.Green + j, 0, 255), (byte)Math.Clamp(c.Blue + j, 0, 255)));
            }
        using var data = bmp.Encode(SKEncodedImageFormat.Png, 100);
        File.WriteAllBytes(path, data.ToArray());
    }

    /// <summary>Mean RGB in [0, 1] of the border ring (the outer eighth of each side: background in every demo scene) of images [B, 3, H, W] in [−1, 1].</summary>
    static float[] BorderMean(Tensor images)
    {
        using var scope = NewDisposeScope();
        long h = images.shape[2], w = images.shape[3];
        long band = Math.Max(1, h / 8);
        var mask = ones(h, w, dtype: ScalarType.Bool);
        mask[TensorIndex.Slice(band, h - band), TensorIndex.Slice(band, w - band)] = tensor(false);
        var ring = mask.flatten().nonzero().squeeze(1);
        var px = ((images.clamp(-1, 1) + 1) / 2).reshape(images.shape[0], 3, h * w).index_select(2, ring);
        return px.mean([0, 2]).data<float>().ToArray();
    }

    /// <summary>Mean RGB in [0, 1] of the central quarter (the circle) of images [B, 3, H, W] in [−1, 1].</summary>
    static float[] CentreMean(Tensor images)
    {
        using var scope = NewDisposeScope();
        long h = images.shape[2], w = images.shape[3];
        var centre = images[.., .., TensorIndex.Slice(3 * h / 8, 5 * h / 8), TensorIndex.Slice(3 * w / 8, 5 * w / 8)];
        return ((centre.clamp(-1, 1) + 1) / 2).mean([0, 2, 3]).data<float>().ToArray();
    }

    static double Distance(float[] a, float[] b) => Math.Sqrt(a.Zip(b).Sum(p => (p.First - p.Second) * (double)(p.First - p.Second)));

    [Fact]
    public void Lora_on_the_demo_model_moves_generated_backgrounds_toward_the_trained_colour() => TrainerTests.OneThread(Run);

    static int Run()
    {
        int size = ImageSize(DemoModel);
        using var tmp = new TempDir();
        var concept = Directory.CreateDirectory(Path.Combine(tmp.Path, "data", "10_sks")).FullName;
        for (int i = 0; i < 4; i++)
        {
            WriteImage(Path.Combine(concept, $"img{i}.png"), size, i);
            File.WriteAllText(Path.Combine(concept, $"img{i}.txt"), Caption);
        }
        var config = SdTrainConfig.FromTomlText($"""
            pretrained_model_name_or_path = "{DemoModel}"
            tokenizer_path = "{DemoTokenizer}"
            train_data_dir = "{Path.Combine(tmp.Path, "data")}"
            output_dir = "{Path.Combine(tmp.Path, "out")}"
            output_name = "cyan"
            resolution = "{size}"
            caption_extension = ".txt"
            network_module = "networks.lora"
            network_dim = 8
            network_alpha = 8
            learning_rate = 4e-3
            optimizer_type = "AdamW"
            lr_scheduler = "constant"
            max_train_steps = 300
            train_batch_size = 4
            seed = 5
            cache_latents = true
            """.Replace("\\", "/"));

        // the training images' statistic (through the same ring)
        float[] target;
        using (var scope = NewDisposeScope())
        {
            var imgs = stack(Directory.GetFiles(concept, "*.png").Select(f =>
            {
                using var bmp = SKBitmap.Decode(f);
                var rgb = bmp.Pixels.SelectMany(c => new[] { c.Red / 127.5f - 1, c.Green / 127.5f - 1, c.Blue / 127.5f - 1 }).ToArray();
                return tensor(rgb).reshape(size, size, 3).permute(2, 0, 1);
            }).ToArray());
            target = BorderMean(imgs);
        }

        string before;
        using (var baseModel = StableDiffusionModel.Load(DemoModel)) before = LearningTests.BaseChecksum(baseModel);
        using var trainer = new SdTrainer(config);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var result = trainer.Train();
        var trainTime = sw.Elapsed;
        var adapter = trainer.Host!["lora"];
        adapter.Enabled = false;
        Assert.Equal(before, LearningTests.BaseChecksum(trainer.Model!));

        trainer.Model!.eval();
        (float[] Ring, float[] Centre) Generate(bool enabled)
        {
            adapter.Enabled = enabled;
            using var r = trainer.Pipeline.Generate(new LoraSharp.Diffusion.Txt2ImgRequest
            {
                Prompt = Caption, NegativePrompt = "", Steps = 20, Sampler = "DDIM", CfgScale = 4, Seed = 100, BatchSize = 8, Width = size, Height = size,
            });
            return (BorderMean(r.Images!), CentreMean(r.Images!));
        }
        var (baseMean, baseCentre) = Generate(false);
        var (loraMean, loraCentre) = Generate(true);
        double baseDist = Distance(baseMean, target), loraDist = Distance(loraMean, target);
        string F(float[] v) => string.Join(", ", v.Select(x => x.ToString("0.000", CultureInfo.InvariantCulture)));
        var report = $"background RGB: training images [{F(target)}], base [{F(baseMean)}] (distance {baseDist:0.000}), with LoRA [{F(loraMean)}] (distance {loraDist:0.000}); " +
                     $"centre base [{F(baseCentre)}], with LoRA [{F(loraCentre)}]; {result.Steps} steps in {trainTime.TotalSeconds:0.0} s, image size {size}";
        Console.WriteLine(report);
        Assert.True(baseDist > 0.25, "the base model already draws the training background: " + report);
        Assert.True(loraDist < 0.5 * baseDist, "the LoRA did not move the background halfway to the training colour: " + report);
        Assert.True(loraCentre[2] < Math.Min(loraCentre[0], loraCentre[1]) - 0.2, "the circle is no longer yellow: " + report);
        return 0;
    }
}
